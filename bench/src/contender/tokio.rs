//! The tokio driver as a contender: one task per contender on a two-worker runtime.

use std::collections::HashMap;
use std::time::Duration;

use std::sync::Arc;

use consul_lock_tokio::{Client, ClientConfig, KeySet, KeySetOptions, Lock};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::{ContenderError, LockRequest, Output, parse};
use crate::protocol::{Command, Event, now_ns};

/// How long `quit` waits for every contender to release and end its session.
const QUIT_DEADLINE: Duration = Duration::from_secs(20);

/// Runs the tokio contender until `quit` or the end of standard input.
pub fn run() -> Result<(), ContenderError> {
    let runtime = ::tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve())
}

async fn serve() -> Result<(), ContenderError> {
    let out = Output::stdout();
    out.send(&Event::Ready { t_ns: now_ns() });
    let mut lines = BufReader::new(::tokio::io::stdin()).lines();
    let mut shared: HashMap<String, Client> = HashMap::new();
    // Dropping a contender's sender also tells it to stop (release, or give up waiting).
    let mut unlocks: HashMap<u64, oneshot::Sender<()>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut sets: Vec<Arc<KeySet>> = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let Some(command) = parse(&line, &out) else {
            continue;
        };
        match command {
            Command::Quit => break,
            Command::Unlock { id } => match unlocks.remove(&id) {
                Some(tx) => {
                    let _ = tx.send(());
                }
                None => out.error(Some(id), "unlock: no such contender"),
            },
            Command::AcquireSet {
                addr,
                prefix,
                n,
                ttl_ms,
            } => match set_client(&mut shared, &addr) {
                Ok(client) => match key_set(&client, ttl_ms) {
                    Ok(set) => {
                        let set = Arc::new(set);
                        sets.push(set.clone());
                        tasks.spawn(hold_set(set, prefix, n, out.clone()));
                    }
                    Err(e) => out.error(None, format!("key set: {e}")),
                },
                Err(e) => out.error(None, e),
            },
            Command::Stats => out.send(&Event::Stats {
                requests: shared.values().map(Client::requests_sent).sum(),
            }),
            lock => match LockRequest::from_command(lock) {
                Some(Ok(request)) => {
                    let client = request.client(&mut shared, Client::new);
                    match client.and_then(|client| client.lock(request.options)) {
                        Ok(lock) => {
                            let (tx, rx) = oneshot::channel();
                            unlocks.insert(request.id, tx);
                            tasks.spawn(contend(lock, request.id, request.write_every, out.clone(), rx));
                        }
                        Err(e) => out.error(Some(request.id), e.to_string()),
                    }
                }
                Some(Err((id, e))) => out.error(Some(id), e),
                None => {}
            },
        }
        // Reap finished contenders as we go, so that a long run doesn't keep them all.
        while tasks.try_join_next().is_some() {}
    }
    drop(unlocks);
    let _ = ::tokio::time::timeout(QUIT_DEADLINE, async {
        for set in &sets {
            set.close().await;
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    })
    .await;
    out.send(&Event::Bye);
    Ok(())
}

/// One contender: acquire, report, then wait to be told to unlock (reporting a loss meanwhile).
async fn contend(
    lock: Lock,
    id: u64,
    write_every: Option<Duration>,
    out: Output,
    mut unlock: oneshot::Receiver<()>,
) {
    let acquired = ::tokio::select! {
        acquired = lock.acquire() => acquired,
        // Told to stop before holding: dropping the acquire future cancels the attempt.
        _ = &mut unlock => {
            lock.close().await;
            return;
        }
    };
    let guard = match acquired {
        Ok(guard) => guard,
        Err(e) => {
            out.error(Some(id), format!("acquire: {e}"));
            return;
        }
    };
    let seq = guard.token().sequence();
    out.send(&Event::Held {
        id,
        t_ns: now_ns(),
        session: guard.token().session.as_str().to_owned(),
        seq,
    });
    let mut watch = guard.watch();
    // A write to the fenced resource every `write_every` while the loss is not yet known (a
    // period of a year stands for "never": the arm just never fires).
    let mut writes = ::tokio::time::interval(write_every.unwrap_or(Duration::from_secs(365 * 86_400)));
    writes.set_missed_tick_behavior(::tokio::time::MissedTickBehavior::Delay);
    writes.reset();
    loop {
        ::tokio::select! {
            lost = watch.lost() => {
                if lost.is_ok() {
                    out.send(&Event::Lost { id, t_ns: now_ns() });
                }
                let _ = unlock.await;
                break;
            }
            _ = &mut unlock => break,
            _ = writes.tick(), if write_every.is_some() => out.send(&Event::Write { id, t_ns: now_ns(), seq }),
        }
    }
    out.send(&Event::Unlocking { id, t_ns: now_ns() });
    let released = guard.release().await;
    out.send(&Event::Unlocked { id, t_ns: now_ns() });
    if let Err(e) = released {
        out.error(Some(id), format!("release: {e}"));
    }
    lock.close().await;
}

/// The client shared by every contender of the process for `addr`.
fn set_client(shared: &mut HashMap<String, Client>, addr: &str) -> Result<Client, String> {
    if let Some(client) = shared.get(addr) {
        return Ok(client.clone());
    }
    let config = ClientConfig::http(addr).map_err(|e| format!("bad addr {addr:?}: {e}"))?;
    let client = Client::new(config).map_err(|e| e.to_string())?;
    shared.insert(addr.to_owned(), client.clone());
    Ok(client)
}

fn key_set(client: &Client, ttl_ms: u64) -> Result<KeySet, consul_lock_tokio::Error> {
    let mut options = KeySetOptions::new();
    if let Some(session) = options.hold.session_options_mut() {
        session.ttl = Duration::from_millis(ttl_ms);
    }
    client.key_set_with(options)
}

/// Takes `<prefix>/<i>` for `i` in `0..n`, reports each key held (contender id `i`), then each
/// key lost, until the set is closed.
async fn hold_set(set: Arc<KeySet>, prefix: String, n: u64, out: Output) {
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}/{i}")).collect();
    let id_of = |key: &str| key.rsplit('/').next().and_then(|i| i.parse::<u64>().ok());
    match set.acquire(&keys).await {
        Ok(got) => {
            let t_ns = now_ns();
            for token in got.held {
                if let Some(id) = id_of(token.key.as_str()) {
                    out.send(&Event::Held {
                        id,
                        t_ns,
                        session: token.session.as_str().to_owned(),
                        seq: token.sequence(),
                    });
                }
            }
            for (key, why) in got.refused {
                out.error(id_of(key.as_str()), format!("refused: {why:?}"));
            }
        }
        Err(e) => {
            out.error(None, format!("acquire_set: {e}"));
            return;
        }
    }
    while let Some(loss) = set.next_loss().await {
        if let Some(id) = id_of(loss.key.as_str()) {
            out.send(&Event::Lost { id, t_ns: now_ns() });
        }
    }
}
