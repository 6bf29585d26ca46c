//! Takes a lock on a real Consul agent, holds it for a moment, and releases it.
//!
//! Uses the agent named by `CONSUL_HTTP_ADDR` (and the other `CONSUL_*` variables) when set;
//! otherwise starts a throwaway `consul agent -dev` on loopback (fetching Consul if needed).
//!
//! ```text
//! cargo run -p consul-lock-testkit --example lock_once [key]
//! ```
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{LockEvent, LockMachine, LockOptions};
use consul_lock_testkit::{ConsulAgent, TestTransport, ThreadDriver};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "consul-lock/example/.lock".to_owned());
    let mut _agent = None;
    let config = if std::env::var_os("CONSUL_HTTP_ADDR").is_some() {
        ClientConfig::from_env_vars(std::env::vars(), |path: &std::path::Path| {
            std::fs::read_to_string(path)
        })?
    } else {
        println!("CONSUL_HTTP_ADDR is not set: starting a dev agent on loopback");
        let agent = ConsulAgent::start()?;
        let config = agent.config()?;
        _agent = Some(agent);
        config
    };
    println!("agent: {}", config.base_url());

    let mut options = LockOptions::new(&key)?;
    options.hold.value = format!("pid {}", std::process::id()).into_bytes();
    let mut lock = LockMachine::new(config, options)?;
    let mut driver = ThreadDriver::new(TestTransport::new()?);

    let started = Instant::now();
    lock.lock(Instant::now())?;
    let event = driver.run_until(&mut lock, Duration::from_secs(60), |e| {
        !matches!(e, LockEvent::Lost(_))
    });
    match event {
        Some(LockEvent::Acquired(token)) => println!(
            "acquired {:?} in {:.1?}: session {}, fencing token {} (sequence), LockIndex {} (Go's)",
            token.key.as_str(),
            started.elapsed(),
            token.session,
            token.sequence(),
            token.lock_index
        ),
        other => return Err(format!("no lock: {other:?}").into()),
    }

    // Hold it for a moment: the machine renews the session and watches the key meanwhile.
    if let Some(LockEvent::Lost(reason)) = driver.run_until(&mut lock, Duration::from_secs(2), |_| true) {
        return Err(format!("lost the lock: {reason:?}").into());
    }

    let releasing = Instant::now();
    lock.unlock(Instant::now())?;
    match driver.run_until(&mut lock, Duration::from_secs(30), |e| {
        matches!(e, LockEvent::Released)
    }) {
        Some(_) => println!("released in {:.1?}; session destroyed", releasing.elapsed()),
        None => return Err("no release within 30 s".into()),
    }
    Ok(())
}
