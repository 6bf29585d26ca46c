//! The blocking driver as a contender: one thread per contender, as a threaded program would
//! use it.

use std::collections::HashMap;
use std::io::{self, BufRead};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use consul_lock_blocking::{Client, HoldEnd, Lock, StopHandle};

use super::{ContenderError, LockRequest, Output, parse};
use crate::protocol::{Command, Event, now_ns};

/// What a holding thread waits for: the suite's unlock, or the loss its watch thread saw.
enum Wake {
    Unlock,
    Lost { t_ns: u64 },
}

struct Contender {
    wake: mpsc::Sender<Wake>,
    stop: StopHandle,
    thread: JoinHandle<()>,
}

/// Runs the blocking contender until `quit` or the end of standard input.
pub fn run() -> Result<(), ContenderError> {
    let out = Output::stdout();
    out.send(&Event::Ready { t_ns: now_ns() });
    let mut shared: HashMap<String, Client> = HashMap::new();
    let mut contenders: HashMap<u64, Contender> = HashMap::new();
    for line in io::stdin().lock().lines() {
        let Some(command) = parse(&line?, &out) else {
            continue;
        };
        match command {
            Command::Quit => break,
            Command::Unlock { id } => match contenders.get(&id) {
                Some(c) => {
                    // A contender still waiting gives up; a holder releases.
                    c.stop.stop();
                    let _ = c.wake.send(Wake::Unlock);
                }
                None => out.error(Some(id), "unlock: no such contender"),
            },
            Command::AcquireSet { .. } | Command::Stats => {
                out.error(None, "acquire_set and stats: the tokio contender's commands");
            }
            lock => match LockRequest::from_command(lock) {
                Some(Ok(request)) => {
                    let client = request.client(&mut shared, Client::new);
                    let write_every = request.write_every;
                    match client.and_then(|client| client.lock(request.options)) {
                        Ok(lock) => {
                            let (wake, woken) = mpsc::channel();
                            let stop = Lock::stop_handle();
                            let thread = {
                                let (out, stop, id, wake) =
                                    (out.clone(), stop.clone(), request.id, wake.clone());
                                thread::spawn(move || {
                                    contend(&lock, id, &out, (&wake, &woken), &stop, write_every);
                                    // As the tokio contender does: wait for the lock's cleanup (its
                                    // session destroyed) rather than drop it, which gives the
                                    // cleanup 2 s. A session whose destroy was cut short stays
                                    // until Consul expires it, and each leader election restarts
                                    // that clock: in the lab, the blocking client's key stayed
                                    // with such a session through three leader faults.
                                    lock.close();
                                })
                            };
                            if let Some(old) = contenders.insert(request.id, Contender { wake, stop, thread })
                            {
                                let _ = old.thread.join();
                            }
                        }
                        Err(e) => out.error(Some(request.id), e.to_string()),
                    }
                }
                Some(Err((id, e))) => out.error(Some(id), e),
                None => {}
            },
        }
    }
    for contender in contenders.values() {
        contender.stop.stop();
        let _ = contender.wake.send(Wake::Unlock);
    }
    for (_, contender) in contenders {
        let _ = contender.thread.join();
    }
    out.send(&Event::Bye);
    Ok(())
}

fn contend(
    lock: &Lock,
    id: u64,
    out: &Output,
    (wake, woken): (&mpsc::Sender<Wake>, &mpsc::Receiver<Wake>),
    stop: &StopHandle,
    write_every: Option<Duration>,
) {
    let guard = match lock.acquire_with(None, Some(stop)) {
        Ok(guard) => guard,
        Err(_) if stop.is_stopped() => return,
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
    // std has no select over two channels: a watch thread turns the loss into a wake-up of this
    // one, so that the holder sleeps until either comes (no polling) and each is seen at once.
    let mut watch = guard.watch();
    let wake = wake.clone();
    thread::spawn(move || {
        if let Ok(Some(HoldEnd::Lost(_))) = watch.wait(None) {
            let _ = wake.send(Wake::Lost { t_ns: now_ns() });
        }
    });
    // Until told to unlock or told of the loss: a write to the fenced resource every
    // `write_every`, each stamped while the loss is still unknown to this thread.
    let first = loop {
        let Some(every) = write_every else {
            break woken.recv();
        };
        match woken.recv_timeout(every) {
            Err(mpsc::RecvTimeoutError::Timeout) => out.send(&Event::Write {
                id,
                t_ns: now_ns(),
                seq,
            }),
            Ok(wake) => break Ok(wake),
            Err(mpsc::RecvTimeoutError::Disconnected) => break Err(mpsc::RecvError),
        }
    };
    if let Ok(Wake::Lost { t_ns }) = first {
        out.send(&Event::Lost { id, t_ns });
        // Hold on to the lost guard until told to unlock, as the other contenders do.
        while let Ok(Wake::Lost { .. }) = woken.recv() {}
    }
    out.send(&Event::Unlocking { id, t_ns: now_ns() });
    let released = guard.release();
    out.send(&Event::Unlocked { id, t_ns: now_ns() });
    if let Err(e) = released {
        out.error(Some(id), format!("release: {e}"));
    }
}
