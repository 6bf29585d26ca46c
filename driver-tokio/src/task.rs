//! The task that owns a lock or semaphore machine ([`HoldMachine`]): it feeds the machine replies and timeouts, sends what it
//! asks for, and turns its events into answers for the lock handle and its guards.

use std::time::Instant;

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{
    Action, FencingToken, HoldMachine, LockEvent, LockStatus, LossReason, Retry,
};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, oneshot, watch};

use crate::Error;

/// Each acquisition gets a generation, so that a guard or a cancel from an earlier one can't act
/// on a later one.
pub(crate) type Generation = u64;

/// What a guard watches: `None` while held, then why it ended.
pub(crate) type HoldState = Option<HoldEnd>;

/// How a hold (of a lock or a semaphore slot) ended: [`LossWatch::ended`](crate::LossWatch::ended).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldEnd {
    /// The lock was lost, for this reason.
    Lost(LossReason),
    /// The guard released it (or was dropped).
    Released,
}

pub(crate) struct Granted {
    pub(crate) token: FencingToken,
    pub(crate) state: watch::Receiver<HoldState>,
}

pub(crate) enum Command {
    Acquire {
        generation: Generation,
        reply: oneshot::Sender<Result<Granted, Error>>,
    },
    /// The acquire future was dropped before it finished.
    CancelAcquire { generation: Generation },
    /// Release the hold of `generation`; `reply` is `None` when a guard was dropped.
    Release {
        generation: Generation,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    Destroy {
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// End the lock: cancel or release, finish the cleanup, then answer and stop.
    Close { reply: oneshot::Sender<()> },
}

struct Waiters {
    generation: Generation,
    /// The acquisition's latest failed try, for the handle's [`RetryWatch`](crate::RetryWatch).
    retries: watch::Sender<Option<Retry>>,
    acquire: Option<oneshot::Sender<Result<Granted, Error>>>,
    hold: Option<watch::Sender<HoldState>>,
    release: Vec<oneshot::Sender<Result<(), Error>>>,
    destroy: Option<oneshot::Sender<Result<(), Error>>>,
}

pub(crate) async fn run<M: HoldMachine>(
    mut machine: M,
    http: reqwest::Client,
    config: ClientConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    retries: watch::Sender<Option<Retry>>,
) {
    let config = std::sync::Arc::new(config);
    // The requests in flight are polled by this task itself rather than spawned: a reply then
    // reaches the machine without a hop between tasks (the handoff benchmark's path crosses
    // four such replies), and dropping the task drops, so cancels, them all.
    let mut inflight = FuturesUnordered::new();
    let mut waiters = Waiters {
        generation: 0,
        retries,
        acquire: None,
        hold: None,
        release: Vec::new(),
        destroy: None,
    };
    let mut handles_gone = false;
    let mut closed: Option<oneshot::Sender<()>> = None;
    loop {
        while let Some(action) = machine.poll_action() {
            match action {
                Action::Send(t) => {
                    let (http, config) = (http.clone(), config.clone());
                    inflight.push(async move {
                        let (reply, tls_refused) =
                            crate::transport::exchange(http, &config, t.request, t.deadline).await;
                        (t.id, reply, tls_refused)
                    });
                }
                Action::Event(event) => on_event(&mut machine, &mut waiters, event),
            }
        }
        if handles_gone {
            // Nobody can ask anything any more: finish what is under way, then stop.
            if matches!(machine.status(), LockStatus::Acquiring) {
                machine.cancel(Instant::now());
                continue;
            }
            if machine.status() == LockStatus::Held {
                let _ = machine.unlock(Instant::now());
                continue;
            }
            if machine.is_quiescent() {
                break;
            }
        }
        let timer = machine.poll_timeout();
        tokio::select! {
            command = commands.recv(), if !handles_gone => match command {
                Some(Command::Close { reply }) => {
                    closed = Some(reply);
                    handles_gone = true;
                }
                Some(command) => on_command(&mut machine, &mut waiters, command),
                None => handles_gone = true,
            },
            Some((id, reply, tls_refused)) = inflight.next(), if !inflight.is_empty() => {
                let now = Instant::now();
                if tls_refused && waiters.acquire.is_some() && machine.status() == LockStatus::Acquiring {
                    // The machine would retry for ever (a transport error is transient to it),
                    // but no answer can come while the TLS setup is wrong: tell the caller.
                    let why = reply.as_ref().err().map(|e| e.message.clone()).unwrap_or_default();
                    answer(&mut waiters.acquire, Err(Error::TlsHandshake(why)));
                    machine.cancel(now);
                }
                machine.handle_response(now, id, reply);
            }
            () = sleep_until(timer), if timer.is_some() => machine.handle_timeout(Instant::now()),
        }
    }
    tracing::debug!("lock task done");
    if let Some(reply) = closed {
        let _ = reply.send(());
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
    }
}

fn on_command(machine: &mut impl HoldMachine, w: &mut Waiters, command: Command) {
    let now = Instant::now();
    match command {
        Command::Acquire { generation, reply } => match machine.lock(now) {
            Ok(()) => {
                w.generation = generation;
                w.acquire = Some(reply);
            }
            Err(e) => {
                let _ = reply.send(Err(Error::Lock(e)));
            }
        },
        Command::CancelAcquire { generation } if generation == w.generation => {
            w.acquire = None;
            match machine.status() {
                LockStatus::Acquiring => machine.cancel(now),
                // Acquired, but the future was dropped before it took the grant out of its
                // channel (`w.hold` is set as soon as the grant is sent, so it can't tell): the
                // future disarms its cancel in the very poll that takes the answer, so a cancel
                // of the generation held means no guard was ever made. Nobody else will release
                // this hold.
                LockStatus::Held => {
                    let _ = machine.unlock(now);
                }
                _ => {}
            }
        }
        Command::Release { generation, reply } if generation == w.generation => match machine.status() {
            LockStatus::Held => {
                let _ = machine.unlock(now);
                w.release.extend(reply);
            }
            LockStatus::Releasing => w.release.extend(reply),
            // Already lost or released: nothing to do.
            _ => {
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
            }
        },
        // A stale generation: its hold is long over.
        Command::CancelAcquire { .. } => {}
        Command::Release { reply, .. } => {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
        }
        // Handled by the loop, which stops reading commands.
        Command::Close { reply } => {
            let _ = reply.send(());
        }
        Command::Destroy { reply } => match machine.destroy(now) {
            Ok(()) => w.destroy = Some(reply),
            Err(e) => {
                let _ = reply.send(Err(Error::Lock(e)));
            }
        },
    }
}

fn on_event(machine: &mut impl HoldMachine, w: &mut Waiters, event: LockEvent) {
    let now = Instant::now();
    match event {
        LockEvent::Acquired(token) => {
            w.retries.send_replace(None);
            let (hold, state) = watch::channel(None);
            match w.acquire.take() {
                Some(reply) => match reply.send(Ok(Granted { token, state })) {
                    Ok(()) => w.hold = Some(hold),
                    // The acquire future is gone: nobody will hold this lock.
                    Err(_) => {
                        let _ = machine.unlock(now);
                    }
                },
                None => {
                    let _ = machine.unlock(now);
                }
            }
        }
        LockEvent::Lost(reason) => {
            if let Some(hold) = w.hold.take() {
                let _ = hold.send(Some(HoldEnd::Lost(reason)));
            }
            for reply in w.release.drain(..) {
                let _ = reply.send(Ok(()));
            }
        }
        LockEvent::Released => {
            if let Some(hold) = w.hold.take() {
                let _ = hold.send(Some(HoldEnd::Released));
            }
            for reply in w.release.drain(..) {
                let _ = reply.send(Ok(()));
            }
        }
        LockEvent::ReleaseFailed(e) => {
            if let Some(hold) = w.hold.take() {
                let _ = hold.send(Some(HoldEnd::Released));
            }
            for reply in w.release.drain(..) {
                let _ = reply.send(Err(Error::Lock(e.clone())));
            }
        }
        LockEvent::Retrying(retry) => {
            w.retries.send_replace(Some(retry));
        }
        LockEvent::GaveUp => answer(&mut w.acquire, Err(Error::GaveUp)),
        LockEvent::Cancelled => {
            answer(
                &mut w.acquire,
                Err(Error::Lock(consul_lock_core::machine::LockError::NotHeld)),
            );
            if let Some(reply) = w.destroy.take() {
                let _ = reply.send(Err(Error::DriverStopped));
            }
        }
        LockEvent::Failed(e) => {
            if let Some(reply) = w.destroy.take() {
                let _ = reply.send(Err(Error::Lock(e)));
            } else {
                answer(&mut w.acquire, Err(Error::Lock(e)));
            }
        }
        LockEvent::Destroyed => {
            if let Some(reply) = w.destroy.take() {
                let _ = reply.send(Ok(()));
            }
        }
    }
}

fn answer(slot: &mut Option<oneshot::Sender<Result<Granted, Error>>>, result: Result<Granted, Error>) {
    if let Some(reply) = slot.take() {
        let _ = reply.send(result);
    }
}
