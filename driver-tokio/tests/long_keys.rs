//! A key too long to encode in a request URI is refused when the lock is made, with a typed
//! error, instead of reaching a panic in request encoding inside the lock's task.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use consul_lock_core::api::{ClientConfig, Key, KeyError};
use consul_lock_core::machine::OptionsError;
use consul_lock_tokio::{Client, Error};

fn client() -> Client {
    Client::new(ClientConfig::http("127.0.0.1:1").unwrap()).unwrap()
}

fn is_too_long<T>(result: Result<T, Error>, encoded_len: usize) -> bool {
    matches!(
        result,
        Err(Error::Options(OptionsError::Key(KeyError::TooLong { encoded_len: len, limit })))
            if len == encoded_len && limit == Key::MAX_ENCODED_LEN
    )
}

#[tokio::test]
async fn lock_key_and_semaphore_prefix_refuse_keys_over_the_limit() {
    let client = client();
    let over = Key::MAX_ENCODED_LEN + 1;
    let cjk = "中".repeat(Key::MAX_ENCODED_LEN / 9) + &"k".repeat(Key::MAX_ENCODED_LEN % 9 + 1);
    for key in ["k".repeat(over), cjk] {
        assert!(is_too_long(client.lock_key(&key), over));
        assert!(is_too_long(client.semaphore_prefix(&key, 2), over));
    }
}

#[tokio::test]
async fn keys_at_the_limit_are_accepted() {
    let client = client();
    let cjk = "中".repeat(Key::MAX_ENCODED_LEN / 9) + &"k".repeat(Key::MAX_ENCODED_LEN % 9);
    for key in ["k".repeat(Key::MAX_ENCODED_LEN), cjk] {
        assert!(client.lock_key(&key).is_ok());
        assert!(client.semaphore_prefix(&key, 2).is_ok());
    }
}

#[test]
fn a_config_too_long_to_encode_is_refused() {
    let mut config = ClientConfig::http("127.0.0.1:1").unwrap();
    config.datacenter = Some("d".repeat(ClientConfig::MAX_NAME_LEN + 1));
    assert!(matches!(Client::new(config), Err(Error::Config(_))));
}
