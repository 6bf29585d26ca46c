//! Observation and election on tokio: [`Observer`] drives core's [`ObserverMachine`] in a task
//! of its own and hands its events out as a stream; [`Election`] campaigns with a lock whose
//! value is the candidate's, and [`Leadership`] is its guard, with proclaim and resign.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{
    Action, FencingToken, Leader, LockError, LockOptions, LossReason, Observation, ObserveEvent,
    ObserveOptions, ObserverMachine,
};
use futures_util::stream::{FuturesUnordered, Stream, StreamExt as _};
use tokio::sync::{mpsc, watch};

use crate::{Client, Error, HoldEnd, Lock, LockGuard, LossWatch};

/// Who leads on a key, and every change of leader, as they happen ([`Client::observe`]).
///
/// A [`Stream`] of [`ObserveEvent`]s (also [`recv`](Observer::recv)): a new leader, a new
/// value of the leader, no leader, could not see for a while, seeing again; in Consul's order,
/// each once, the leader's [`sequence`](Leader::sequence) never going backwards. It carries on
/// through agent errors and restarts; the stream ends only after [`ObserveEvent::Failed`] (a
/// refusal retrying can't fix, such as ACLs) or if the runtime stops. Dropping it stops the
/// observation. [`current`](Observer::current) answers what the key shows now, without waiting.
///
/// ```no_run
/// # async fn run() -> Result<(), consul_lock_tokio::Error> {
/// use consul_lock_tokio::ObserveEvent;
///
/// let client = consul_lock_tokio::Client::from_env()?;
/// let mut leaders = client.observe("service/leader")?;
/// while let Some(event) = leaders.recv().await {
///     match event {
///         ObserveEvent::Leader(l) | ObserveEvent::Value(l) => {
///             println!("leader: {} on {:?}", String::from_utf8_lossy(&l.value), l.node)
///         }
///         ObserveEvent::NoLeader { .. } => println!("no leader"),
///         other => println!("{other:?}"),
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Observer {
    events: mpsc::UnboundedReceiver<ObserveEvent>,
    current: watch::Receiver<Option<Observation>>,
}

impl Observer {
    /// Starts observing with `options` on `client`'s connection pool. Must be called inside a
    /// tokio runtime.
    pub(crate) fn start(client: &Client, mut options: ObserveOptions) -> Result<Observer, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        options.seed = crate::seed::fresh();
        let machine = ObserverMachine::new((*client.config).clone(), options, Instant::now())?;
        let (tx, events) = mpsc::unbounded_channel();
        let (current_tx, current) = watch::channel(None);
        runtime.spawn(run(
            machine,
            client.transport.clone(),
            (*client.config).clone(),
            tx,
            current_tx,
        ));
        Ok(Observer { events, current })
    }

    /// The next change; `None` once the observation is over (after [`ObserveEvent::Failed`],
    /// or when the runtime stopped).
    pub async fn recv(&mut self) -> Option<ObserveEvent> {
        self.events.recv().await
    }

    /// What the key showed at the last answer (`None` before the first).
    pub fn current(&self) -> Option<Observation> {
        self.current.borrow().clone()
    }

    /// The leader as of the last answer.
    pub fn leader(&self) -> Option<Leader> {
        match self.current() {
            Some(Observation::Leader(l)) => Some(l),
            _ => None,
        }
    }

    /// The first answer: the leader, or `None` when nobody leads. An error when the reads were
    /// refused, or failed for the options' `blind_after`.
    pub(crate) async fn first(&mut self) -> Result<Option<Leader>, Error> {
        loop {
            match self.recv().await {
                Some(ObserveEvent::Leader(l) | ObserveEvent::Value(l)) => return Ok(Some(l)),
                Some(ObserveEvent::NoLeader { .. }) => return Ok(None),
                Some(ObserveEvent::Failed(e)) => return Err(Error::Lock(e)),
                Some(ObserveEvent::Blind { last, .. }) => {
                    return Err(Error::Lock(LockError::Unavailable(last)));
                }
                Some(ObserveEvent::Resumed { .. }) => {}
                None => return Err(Error::DriverStopped),
            }
        }
    }
}

impl Stream for Observer {
    type Item = ObserveEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ObserveEvent>> {
        self.events.poll_recv(cx)
    }
}

/// The observer's task: the machine's requests out, their replies and its timer in, its events
/// to the [`Observer`], until the observer is dropped or the observation is over.
async fn run(
    mut machine: ObserverMachine,
    transport: std::sync::Arc<crate::transport::Transport>,
    config: ClientConfig,
    events: mpsc::UnboundedSender<ObserveEvent>,
    current: watch::Sender<Option<Observation>>,
) {
    let config = std::sync::Arc::new(config);
    let mut inflight = FuturesUnordered::new();
    loop {
        while let Some(action) = machine.poll_action() {
            match action {
                Action::Send(t) => {
                    inflight.push(crate::transport::transmit(transport.clone(), config.clone(), t))
                }
                Action::Event(event) => {
                    current.send_replace(machine.current().cloned());
                    if events.send(event).is_err() {
                        return;
                    }
                }
            }
        }
        if machine.is_over() {
            tracing::debug!("observer task done");
            return;
        }
        let timer = machine.poll_timeout();
        tokio::select! {
            () = events.closed() => return,
            Some((id, reply)) = inflight.next(), if !inflight.is_empty() => {
                machine.handle_response(Instant::now(), id, reply);
            }
            () = crate::task::sleep_until(timer), if timer.is_some() => machine.handle_timeout(Instant::now()),
        }
    }
}

/// Leader election on one key ([`Client::election`]): campaign to lead, with a value for
/// everyone to see (the leader's address, say: stored in the key, as Go's lock stores its
/// value, so Go's and `consul lock`'s candidates and observers share the election); follow who
/// leads with [`observe`](Election::observe) and [`leader`](Election::leader).
///
/// ```no_run
/// # async fn serve() {}
/// # async fn run() -> Result<(), consul_lock_tokio::Error> {
/// let client = consul_lock_tokio::Client::from_env()?;
/// let election = client.election("service/leader")?;
/// let mut leading = election.campaign("10.0.0.7:8080").await?;
/// tokio::select! {
///     () = serve() => leading.resign().await?,
///     lost = leading.lost() => eprintln!("no longer leading: {lost:?}"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Election {
    client: Client,
    options: LockOptions,
}

impl Election {
    pub(crate) fn new(client: Client, options: LockOptions) -> Election {
        Election { client, options }
    }

    /// Waits to lead, with `value` in the key (written by the acquire, in the same write).
    /// Cancel by dropping the future. Errors as [`Lock::acquire`].
    pub async fn campaign(&self, value: impl Into<Vec<u8>>) -> Result<Leadership, Error> {
        let mut options = self.options.clone();
        options.hold.value = value.into();
        let lock = self.client.lock(options)?;
        let guard = lock.acquire().await?;
        Ok(Leadership { guard, lock })
    }

    /// Who leads now (one consistent read, and a lookup of the leader's session).
    pub async fn leader(&self) -> Result<Option<Leader>, Error> {
        self.client.leader(self.options.key.as_str()).await
    }

    /// Every change of leader on the election's key (see [`Observer`]).
    pub fn observe(&self) -> Result<Observer, Error> {
        self.client.observe(self.options.key.as_str())
    }
}

/// Leading an [`Election`]: the lock's guard, with [`proclaim`](Leadership::proclaim) and
/// [`resign`](Leadership::resign). Leading ends with a reason as a lock's hold does
/// ([`lost`](Leadership::lost), [`watch`](Leadership::watch)). Dropping it resigns in the
/// background.
#[derive(Debug)]
pub struct Leadership {
    // Dropped first: its release goes out before the lock's task sees its handle gone.
    guard: LockGuard,
    lock: Lock,
}

impl Leadership {
    /// The fencing token of this term; a proclaim does not change it.
    pub fn token(&self) -> &FencingToken {
        self.guard.token()
    }

    /// Whether this candidate still leads, as far as it knows right now.
    pub fn is_leading(&self) -> bool {
        self.guard.is_held()
    }

    /// Writes a new `value` to the key, provided this candidate still leads (a transaction
    /// that checks the key's session, then writes it keeping its `LockIndex`).
    ///
    /// [`Error::Lock`] with [`LockError::NotHeld`] when the key is no longer ours (leading is
    /// then lost: [`lost`](Self::lost) resolves), [`LockError::Unavailable`] when the agent did
    /// not answer (the write may have been made; proclaiming again is harmless),
    /// [`Error::Misuse`] ([`Misuse::Busy`](crate::Misuse::Busy)) while another proclaim is in
    /// flight.
    pub async fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<(), Error> {
        self.guard.proclaim(value.into()).await
    }

    /// Stops leading: releases the key and destroys the session, waiting for both.
    pub async fn resign(self) -> Result<(), Error> {
        let Leadership { guard, lock } = self;
        let released = guard.release().await;
        lock.close().await;
        released
    }

    /// Resolves when leading is lost, with the reason (see [`LossWatch::lost`]).
    pub async fn lost(&mut self) -> Result<LossReason, Error> {
        self.guard.lost().await
    }

    /// A watcher of this term's end, to hand to other tasks (see [`LossWatch::ended`]: lost
    /// with a reason, or [`HoldEnd::Released`] after a resign).
    pub fn watch(&self) -> LossWatch {
        self.guard.watch()
    }

    /// How leading ended, if it has.
    pub fn end(&self) -> Option<HoldEnd> {
        self.watch().end()
    }
}
