//! Leader election with the tokio driver: take the lock, work only while leading, step down at
//! once when leadership is lost and try again; Ctrl-C releases the lock and exits, after
//! `Client::shutdown` has waited for the release and the session's destroy to reach Consul.
//!
//! ```text
//! CONSUL_HTTP_ADDR=127.0.0.1:8500 cargo run -p consul-lock-tokio --example leader -- service/leader
//! ```
//!
//! Start two: one leads, the other waits. Stop the leader with Ctrl-C and the other takes over at
//! once; destroy the leader's session (`consul lock`-style tools, or `PUT /v1/session/destroy/<id>`)
//! and it stops work, prints why, and waits its turn again.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use consul_lock_tokio::{Client, Error};

/// One unit of leader work. It is cancelled part way if leadership is lost meanwhile.
async fn work(unit: u64, token: u64) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("unit {unit} of work done under fencing token {token}");
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let key = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "service/leader".to_owned());
    let client = Client::from_env()?; // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...
    lead(&client, &key).await?;
    // Ends whatever is still under way (a cancelled attempt's session) and waits for it.
    client.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}

/// Leads whenever it can, until Ctrl-C.
async fn lead(client: &Client, key: &str) -> Result<(), Error> {
    let lock = client.lock_key(key)?;
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut unit = 0;
    loop {
        println!("waiting for {key}");
        let mut guard = tokio::select! {
            guard = lock.acquire() => guard?,
            // Dropping the acquire future cancels the attempt.
            _ = &mut ctrl_c => return Ok(()),
        };
        let token = guard.token().lock_index;
        println!("leading {key} with fencing token {token}");
        loop {
            tokio::select! {
                biased;
                lost = guard.lost() => {
                    println!("lost leadership: {:?}; stepping down", lost?);
                    break;
                }
                _ = &mut ctrl_c => {
                    guard.release().await?;
                    println!("released {key}");
                    return Ok(());
                }
                () = work(unit + 1, token) => unit += 1,
            }
        }
    }
}
