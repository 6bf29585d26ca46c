//! The task that owns a lock or semaphore machine ([`HoldMachine`]): it feeds the machine replies and timeouts, sends what it
//! asks for, and turns its events into answers for the lock handle and its guards.

use std::sync::Arc;
use std::time::Instant;

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{
    Action, FencingToken, HoldMachine, LockEvent, LockStatus, LossReason, Misuse, Retry,
};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, oneshot, watch};

use crate::Error;
use crate::caught::Caught;
use crate::transport::{Transport, exchange};

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
    /// The lock's task failed (a bug in this crate: its machine panicked, with this message).
    /// The hold may or may not have ended on the agent; its session was destroyed, best effort.
    DriverFailed(String),
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
    /// Write `value` to the key while the hold of `generation` lasts (an election's proclaim).
    Proclaim {
        generation: Generation,
        value: Vec<u8>,
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
    /// The proclaim in flight.
    proclaim: Option<oneshot::Sender<Result<(), Error>>>,
    /// An acquire that came while the last hold was still being released (a guard dropped, or
    /// an acquire future dropped after its grant, just before): it starts once the release is
    /// done, rather than fail with `Busy` for a release the caller never waits for.
    queued: Option<(Generation, oneshot::Sender<Result<Granted, Error>>)>,
}

pub(crate) async fn run<M: HoldMachine>(
    machine: M,
    transport: Arc<Transport>,
    config: ClientConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    retries: watch::Sender<Option<Retry>>,
) {
    let config = Arc::new(config);
    let mut machine = Caught::new(machine);
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
        proclaim: None,
        queued: None,
    };
    let mut handles_gone = false;
    let mut closed: Option<oneshot::Sender<()>> = None;
    loop {
        if let Some(why) = machine.panicked().map(str::to_owned) {
            drop(inflight);
            let session = machine.orphaned_session();
            return end_after_panic(&why, session, waiters, commands, closed, &transport, &config).await;
        }
        while let Some(action) = machine.poll_action() {
            match action {
                Action::Send(t) => {
                    inflight.push(crate::transport::transmit(transport.clone(), config.clone(), t))
                }
                Action::Event(event) => on_event(&mut machine, &mut waiters, event),
            }
        }
        if handles_gone {
            // Closed: a queued acquire never starts.
            if let Some((_, reply)) = waiters.queued.take() {
                let _ = reply.send(Err(Error::Cancelled));
            }
        }
        if waiters.queued.is_some() && machine.status() == LockStatus::Idle {
            start_queued(&mut machine, &mut waiters);
            continue;
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
            Some((id, reply)) = inflight.next(), if !inflight.is_empty() => {
                let now = Instant::now();
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

/// The machine panicked (a bug): every waiter is told why, the session it had is destroyed (so
/// that no key stays held and no session lives on until its TTL), and every later command is
/// answered with the same error until the handles are gone.
async fn end_after_panic(
    why: &str,
    session: Option<consul_lock_core::api::SessionId>,
    mut waiters: Waiters,
    mut commands: mpsc::UnboundedReceiver<Command>,
    closed: Option<oneshot::Sender<()>>,
    transport: &Transport,
    config: &ClientConfig,
) {
    let error = || Error::DriverPanicked(why.to_owned());
    answer(&mut waiters.acquire, Err(error()));
    if let Some((_, reply)) = waiters.queued.take() {
        let _ = reply.send(Err(error()));
    }
    if let Some(hold) = waiters.hold.take() {
        let _ = hold.send(Some(HoldEnd::DriverFailed(why.to_owned())));
    }
    for reply in waiters.release.drain(..) {
        let _ = reply.send(Err(error()));
    }
    if let Some(reply) = waiters.destroy.take() {
        let _ = reply.send(Err(error()));
    }
    if let Some(reply) = waiters.proclaim.take() {
        let _ = reply.send(Err(error()));
    }
    if let Some(id) = session {
        use consul_lock_core::api::{Endpoint as _, SessionDestroy};
        let destroy = SessionDestroy { id: id.clone() };
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let reply = exchange(
            transport,
            config,
            destroy.encode(config),
            destroy.class(),
            deadline,
        )
        .await;
        match reply {
            Ok(r) if r.status().is_success() => {
                tracing::warn!(session = %id, "destroyed the session of a panicked lock")
            }
            other => {
                tracing::warn!(session = %id, ?other, "could not destroy the session of a panicked lock; it expires after its TTL")
            }
        }
    }
    if let Some(reply) = closed {
        let _ = reply.send(());
    }
    while let Some(command) = commands.recv().await {
        match command {
            Command::Acquire { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Command::Release { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error()));
                }
            }
            Command::Destroy { reply } | Command::Proclaim { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Command::Close { reply } => {
                let _ = reply.send(());
                return;
            }
            Command::CancelAcquire { .. } => {}
        }
    }
}

/// Starts the acquire that waited for a release to end.
fn start_queued(machine: &mut impl HoldMachine, w: &mut Waiters) {
    let Some((generation, reply)) = w.queued.take() else {
        return;
    };
    match machine.lock(Instant::now()) {
        Ok(()) => {
            w.generation = generation;
            w.acquire = Some(reply);
        }
        Err(e) => {
            let _ = reply.send(Err(Error::Misuse(e)));
        }
    }
}

pub(crate) async fn sleep_until(at: Option<Instant>) {
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
            // The last hold is being released in the background: wait for it, then acquire.
            Err(Misuse::Busy) if machine.status() == LockStatus::Releasing && w.queued.is_none() => {
                w.queued = Some((generation, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(Error::Misuse(e)));
            }
        },
        // The future of a queued acquire was dropped: it never starts.
        Command::CancelAcquire { generation } if w.queued.as_ref().is_some_and(|(g, _)| *g == generation) => {
            w.queued = None;
        }
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
        Command::Proclaim {
            generation,
            value,
            reply,
        } => {
            // A guard of an earlier hold proclaims nothing on a later one.
            let outcome = if generation == w.generation {
                machine.proclaim(now, value)
            } else {
                Err(Misuse::NotHeld)
            };
            match outcome {
                Ok(()) => w.proclaim = Some(reply),
                Err(e) => {
                    let _ = reply.send(Err(Error::Misuse(e)));
                }
            }
        }
        Command::Destroy { reply } => match machine.destroy(now) {
            Ok(()) => w.destroy = Some(reply),
            Err(e) => {
                let _ = reply.send(Err(Error::Misuse(e)));
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
            answer(&mut w.acquire, Err(Error::Cancelled));
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
        LockEvent::Proclaimed { .. } => {
            if let Some(reply) = w.proclaim.take() {
                let _ = reply.send(Ok(()));
            }
        }
        LockEvent::ProclaimFailed(e) => {
            if let Some(reply) = w.proclaim.take() {
                let _ = reply.send(Err(Error::Lock(e)));
            }
        }
    }
}

fn answer(slot: &mut Option<oneshot::Sender<Result<Granted, Error>>>, result: Result<Granted, Error>) {
    if let Some(reply) = slot.take() {
        let _ = reply.send(result);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use consul_lock_core::api::SessionId;
    use consul_lock_core::machine::{Misuse, Reply, RequestId};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A machine with a bug planted: it panics on its first timer, once it has a session.
    struct Planted {
        locked: bool,
        session: SessionId,
    }

    impl HoldMachine for Planted {
        fn lock(&mut self, _: Instant) -> Result<(), Misuse> {
            self.locked = true;
            Ok(())
        }
        fn unlock(&mut self, _: Instant) -> Result<(), Misuse> {
            Err(Misuse::NotHeld)
        }
        fn cancel(&mut self, _: Instant) {}
        fn destroy(&mut self, _: Instant) -> Result<(), Misuse> {
            Err(Misuse::Busy)
        }
        fn status(&self) -> LockStatus {
            if self.locked {
                LockStatus::Acquiring
            } else {
                LockStatus::Idle
            }
        }
        fn handle_response(&mut self, _: Instant, _: RequestId, _: Reply) {}
        fn handle_timeout(&mut self, _: Instant) {
            std::panic::panic_any("planted bug");
        }
        fn poll_action(&mut self) -> Option<Action<LockEvent>> {
            None
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.locked.then(Instant::now)
        }
        fn is_quiescent(&self) -> bool {
            !self.locked
        }
        fn session_id(&self) -> Option<&SessionId> {
            self.locked.then_some(&self.session)
        }
        fn token(&self) -> Option<&FencingToken> {
            None
        }
        fn in_flight(&self) -> usize {
            0
        }
    }

    /// A machine that panics ends its lock in order: the waiting acquire gets the panic's
    /// message (not "runtime shut down"), the session it had is destroyed, and later calls get
    /// the same error.
    #[tokio::test]
    async fn a_panicking_machine_ends_the_lock_with_its_message_and_destroys_its_session() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ClientConfig::http(&listener.local_addr().unwrap().to_string()).unwrap();
        let transport = Arc::new(Transport::new(&config, crate::ConnectionBudget::default()).unwrap());
        let (commands, rx) = mpsc::unbounded_channel();
        let (retries, _) = watch::channel(None);
        let machine = Planted {
            locked: false,
            session: SessionId::new("s-planted").unwrap(),
        };
        let task = tokio::spawn(run(machine, transport, config, rx, retries));
        let (reply, answer) = oneshot::channel();
        commands.send(Command::Acquire { generation: 1, reply }).unwrap();
        match answer.await.unwrap() {
            Err(Error::DriverPanicked(why)) => assert_eq!(why, "planted bug"),
            Err(other) => panic!("expected DriverPanicked, got {other:?}"),
            Ok(_) => panic!("granted by a machine that panicked"),
        }
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = vec![0; 2048];
        let n = conn.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]).into_owned();
        assert!(head.starts_with("PUT /v1/session/destroy/s-planted "), "{head}");
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ntrue")
            .await
            .unwrap();
        let (reply, answer) = oneshot::channel();
        commands.send(Command::Acquire { generation: 2, reply }).unwrap();
        assert!(matches!(answer.await.unwrap(), Err(Error::DriverPanicked(_))));
        drop(commands);
        task.await.unwrap();
    }
}
