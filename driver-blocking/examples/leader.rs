//! Leader election with the blocking driver: campaign with this process's name as the leader's
//! value, work only while leading, proclaim progress as the value, step down at once when
//! leadership is lost and campaign again; a thread prints who leads, as it changes (the
//! observer: no HTTP in this file). Ends, resigning, after `UNITS` units of work or when
//! standard input closes (Ctrl-D), after `Client::shutdown` has waited for the cleanup to reach
//! Consul.
//!
//! ```text
//! CONSUL_HTTP_ADDR=127.0.0.1:8500 cargo run -p consul-lock-blocking --example leader_blocking -- service/leader [UNITS]
//! ```
//!
//! Start two: one leads, both print who does; end the leader with Ctrl-D and the other takes
//! over at once. (With standard input at its end already, e.g. `< /dev/null`, it stops at once.)
#![allow(clippy::print_stdout)]

use std::time::Duration;

use consul_lock_blocking::{Client, Error, Lock, ObserveEvent};

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let key = args.next().unwrap_or_else(|| "service/leader".to_owned());
    let units: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
    let client = Client::from_env()?; // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...
    let observer = client.observe(&key)?;
    std::thread::spawn(move || {
        for event in observer {
            match event {
                ObserveEvent::Leader(l) | ObserveEvent::Value(l) => println!(
                    "who leads: {:?} (session {:?}, sequence {})",
                    String::from_utf8_lossy(&l.value),
                    l.session_name.as_deref().unwrap_or("?"),
                    l.sequence
                ),
                ObserveEvent::NoLeader { .. } => println!("who leads: nobody"),
                other => println!("who leads: {other:?}"),
            }
        }
    });
    lead(&client, &key, units)?;
    // Ends whatever is still under way (a stopped campaign's session) and waits for it.
    client.shutdown(Duration::from_secs(5))?;
    Ok(())
}

/// Leads whenever it can, until `units` units of work are done or standard input closes.
fn lead(client: &Client, key: &str, units: u64) -> Result<(), Error> {
    let election = client.election(key)?;
    let me = format!("pid {}", std::process::id());

    // Standard input closing asks us to stop; it also stops a campaign that is waiting.
    let stop = Lock::stop_handle();
    let on_eof = stop.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        on_eof.stop();
    });

    let mut done = 0;
    while !stop.is_stopped() && done < units {
        println!("{me}: campaigning for {key}");
        let leading = match election.campaign_with(me.clone(), None, Some(&stop)) {
            Ok(leading) => leading,
            Err(_) if stop.is_stopped() => break,
            Err(e) => return Err(e),
        };
        let token = leading.token().sequence();
        println!("{me}: leading {key} with fencing token {token}");
        loop {
            // A unit of work, in steps short enough to stop at once on a loss: here, one second
            // of watching for a loss that does not come.
            if let Some(reason) = leading.wait_lost(Duration::from_secs(1))? {
                println!("{me}: lost leadership: {reason:?}; stepping down");
                break;
            }
            done += 1;
            println!("{me}: unit {done} of work done under fencing token {token}");
            if let Err(e) = leading.proclaim(format!("{me}, {done} units done")) {
                println!("{me}: proclaim failed: {e}");
            }
            if stop.is_stopped() || done >= units {
                leading.resign()?;
                println!("{me}: resigned {key}");
                return Ok(());
            }
        }
    }
    Ok(())
}
