//! Leader election with the blocking driver: take the lock, work only while leading, step down at
//! once when leadership is lost and try again. Ends, releasing the lock, after `UNITS` units of
//! work or when standard input closes (Ctrl-D), after `Client::shutdown` has waited for the
//! cleanup to reach Consul.
//!
//! ```text
//! CONSUL_HTTP_ADDR=127.0.0.1:8500 cargo run -p consul-lock-blocking --example leader_blocking -- service/leader [UNITS]
//! ```
//!
//! Start two: one leads, the other waits; end the leader with Ctrl-D and the other takes over at
//! once. (With standard input at its end already, e.g. `< /dev/null`, it stops at once.)
#![allow(clippy::print_stdout)]

use std::time::Duration;

use consul_lock_blocking::{Client, Error, Lock};

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let key = args.next().unwrap_or_else(|| "service/leader".to_owned());
    let units: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
    let client = Client::from_env()?; // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...
    lead(&client, &key, units)?;
    // Ends whatever is still under way (a stopped attempt's session) and waits for it.
    client.shutdown(Duration::from_secs(5))?;
    Ok(())
}

/// Leads whenever it can, until `units` units of work are done or standard input closes.
fn lead(client: &Client, key: &str, units: u64) -> Result<(), Error> {
    let lock = client.lock_key(key)?;

    // Standard input closing asks us to stop; it also stops an `acquire` that is waiting.
    let stop = Lock::stop_handle();
    let on_eof = stop.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        on_eof.stop();
    });

    let mut done = 0;
    while !stop.is_stopped() && done < units {
        println!("waiting for {key}");
        let guard = match lock.acquire_with(None, Some(&stop)) {
            Ok(guard) => guard,
            Err(_) if stop.is_stopped() => break,
            Err(e) => return Err(e),
        };
        let token = guard.token().lock_index;
        println!("leading {key} with fencing token {token}");
        loop {
            // A unit of work, in steps short enough to stop at once on a loss: here, one second
            // of watching for a loss that does not come.
            if let Some(reason) = guard.wait_lost(Duration::from_secs(1))? {
                println!("lost leadership: {reason:?}; stepping down");
                break;
            }
            done += 1;
            println!("unit {done} of work done under fencing token {token}");
            if stop.is_stopped() || done >= units {
                guard.release()?;
                println!("released {key}");
                return Ok(());
            }
        }
    }
    Ok(())
}
