//! The tokio driver as a contender: one task per contender on a two-worker runtime.

use std::collections::HashMap;
use std::time::Duration;

use consul_lock_tokio::{Client, Lock};
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
