//! Leader election with the tokio driver: campaign with this process's name as the leader's
//! value, work only while leading, proclaim progress as the value, step down at once when
//! leadership is lost and campaign again; meanwhile print who leads, as it changes (the
//! observer: no HTTP in this file). Ctrl-C resigns and exits, after `Client::shutdown` has
//! waited for the release and the session's destroy to reach Consul.
//!
//! ```text
//! CONSUL_HTTP_ADDR=127.0.0.1:8500 cargo run -p consul-lock-tokio --example leader -- service/leader
//! ```
//!
//! Start two: one leads, both print who does. Stop the leader with Ctrl-C and the other takes
//! over at once; destroy the leader's session (`PUT /v1/session/destroy/<id>`) and it stops
//! work, prints why, and campaigns again. `consul lock service/leader <cmd>` (Go's client)
//! campaigns too, with `service/leader/.lock` as the key: run this with that key to see it lead.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use consul_lock_tokio::{Client, Error, ObserveEvent};

/// One unit of leader work. It is cancelled part way if leadership is lost meanwhile.
async fn work(unit: u64, token: u64) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("unit {unit} of work done under fencing token {token}");
}

/// An observer's event as one line.
fn who_leads(event: &ObserveEvent) -> String {
    match event {
        ObserveEvent::Leader(l) | ObserveEvent::Value(l) => format!(
            "who leads: {:?} (session {:?} on node {:?}, sequence {})",
            String::from_utf8_lossy(&l.value),
            l.session_name.as_deref().unwrap_or("?"),
            l.node.as_deref().unwrap_or("?"),
            l.sequence
        ),
        ObserveEvent::NoLeader { .. } => "who leads: nobody".to_owned(),
        ObserveEvent::Blind { unseen_for, last, .. } => {
            format!("who leads: unknown for {unseen_for:?} ({last})")
        }
        ObserveEvent::Resumed { unseen_for } => format!("who leads: seeing again after {unseen_for:?}"),
        ObserveEvent::Failed(e) => format!("who leads: can't tell ({e})"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let key = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "service/leader".to_owned());
    let client = Client::from_env()?; // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...
    let mut observer = client.observe(&key)?;
    tokio::spawn(async move {
        while let Some(event) = observer.recv().await {
            println!("{}", who_leads(&event));
        }
    });
    lead(&client, &key).await?;
    // Ends whatever is still under way (a cancelled campaign's session) and waits for it.
    client.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}

/// Leads whenever it can, until Ctrl-C.
async fn lead(client: &Client, key: &str) -> Result<(), Error> {
    let election = client.election(key)?;
    let me = format!("pid {}", std::process::id());
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut unit = 0;
    loop {
        println!("{me}: campaigning for {key}");
        let mut leading = tokio::select! {
            leading = election.campaign(me.clone()) => leading?,
            // Dropping the campaign's future cancels it.
            _ = &mut ctrl_c => return Ok(()),
        };
        let token = leading.token().sequence();
        println!("{me}: leading {key} with fencing token {token}");
        loop {
            tokio::select! {
                biased;
                lost = leading.lost() => {
                    println!("{me}: lost leadership: {:?}; stepping down", lost?);
                    break;
                }
                _ = &mut ctrl_c => {
                    leading.resign().await?;
                    println!("{me}: resigned {key}");
                    return Ok(());
                }
                () = work(unit + 1, token) => {
                    unit += 1;
                    // Everyone watching sees the progress; a failure here is no loss (the
                    // monitor says if leadership is).
                    if let Err(e) = leading.proclaim(format!("{me}, {unit} units done")).await {
                        println!("{me}: proclaim failed: {e}");
                    }
                }
            }
        }
    }
}
