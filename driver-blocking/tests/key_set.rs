//! The blocking driver's key set against a real agent: the tokio driver's task behind blocking
//! calls; Go's `consul lock` waits on one of our keys until we release it, and an operator's
//! delete of one key is that key's loss alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use consul_lock_blocking::{Client, KeySetOptions, LossReason};
use consul_lock_core::api::{Key, KvDelete, KvGet};
use consul_lock_core::machine::LOCK_FLAG_VALUE;
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::golock::{GoLock, PATIENCE, Scratch, at};

#[test]
fn go_waits_on_a_key_of_the_set_and_one_keys_delete_is_its_loss_alone() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let mut options = KeySetOptions::new();
    options.hold.session_options_mut().unwrap().name = "blocking keyset".to_owned();
    let set = client.key_set_with(options).unwrap();
    let base = format!("blocking/keyset/{}", std::process::id());
    let keys: Vec<String> = (0..150).map(|i| format!("{base}/{i}/.lock")).collect();
    let got = set.acquire(&keys).unwrap();
    assert_eq!(got.held.len(), 150, "{:?}", got.refused);
    let read = |key: &str| {
        client
            .call(&KvGet::new(Key::new(key).unwrap()), Duration::from_secs(10))
            .unwrap()
            .value
    };
    let pair = read(&keys[0]).unwrap();
    assert_eq!(pair.flags, LOCK_FLAG_VALUE);

    let scratch = Scratch::new("blocking-keyset-go");
    let mut go = GoLock::spawn(agent, &scratch, &format!("{base}/5"), "go", false);
    go.wait_attempting();
    std::thread::sleep(Duration::from_millis(800));
    assert!(at(&scratch.log(), "go", "start").is_none(), "{}", go.output());
    set.release(&[&keys[5]]).unwrap();
    go.finish();

    client
        .call(
            &KvDelete {
                key: Key::new(keys[9].as_str()).unwrap(),
            },
            Duration::from_secs(10),
        )
        .unwrap();
    let loss = set.wait_loss(Some(PATIENCE)).unwrap().expect("a loss reported");
    assert_eq!(
        (loss.key.as_str(), loss.reason),
        (keys[9].as_str(), LossReason::KeyDeleted)
    );
    assert_eq!(set.held().unwrap().len(), 148);
    set.close();
    assert!(read(&keys[0]).is_none_or(|p| p.session.is_none()));
}
