//! Many lock keys on one session: [`KeySet`], a task that owns a [`KeySetMachine`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use consul_lock_core::api::{ClientConfig, Key};
use consul_lock_core::machine::{
    Action, FencingToken, KeySetError, KeySetEvent, KeySetMachine, LockError, LossReason, Refusal,
};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, oneshot};

use crate::Error;
use crate::task::sleep_until;
use crate::transport::Transport;

/// What [`KeySet::acquire`] ends with: every key asked for is in one of the two lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acquired {
    /// The keys taken, with their fencing tokens, in the order asked.
    pub held: Vec<FencingToken>,
    /// The keys not taken, with why, in the order asked.
    pub refused: Vec<(Key, Refusal)>,
}

/// A key of the set was lost ([`KeySet::next_loss`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyLoss {
    /// The key.
    pub key: Key,
    /// Why.
    pub reason: LossReason,
}

pub(crate) enum Command {
    Acquire {
        keys: Vec<String>,
        reply: oneshot::Sender<Result<Acquired, Error>>,
    },
    Release {
        /// `None`: every held key.
        keys: Option<Vec<String>>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Tokens {
        reply: oneshot::Sender<Vec<FencingToken>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// Many lock keys held on one Consul session ([`Client::key_set`](crate::Client::key_set)).
///
/// Take keys with [`acquire`](Self::acquire) (one or thousands: batched in transactions of up to
/// 64), give some back with [`release`](Self::release) or all with
/// [`release_all`](Self::release_all), and hear of each key's loss with
/// [`next_loss`](Self::next_loss). The session's loss (invalidated, or no renewal acknowledged
/// within its TTL) is the loss of every key it holds: each is reported.
///
/// Monitoring costs the same whatever the number of keys: one blocking read of the session and
/// one per watched prefix (at most [`KeySetOptions::max_watches`](crate::KeySetOptions), 4 by
/// default), plus a renewal every TTL/2. Each key carries Go's lock flags, so Go's `consul lock`
/// and `api.Lock` see it as a held lock and wait.
///
/// A key set never waits for a key another session holds: such a key is refused
/// ([`Refusal::Held`]); ask again later. Dropping the handle closes the set in the background
/// (every key released, then the session destroyed); [`close`](Self::close) does it and waits.
#[derive(Debug)]
pub struct KeySet {
    commands: mpsc::UnboundedSender<Command>,
    losses: tokio::sync::Mutex<mpsc::UnboundedReceiver<KeyLoss>>,
}

impl KeySet {
    pub(crate) fn new(
        commands: mpsc::UnboundedSender<Command>,
        losses: mpsc::UnboundedReceiver<KeyLoss>,
    ) -> KeySet {
        KeySet {
            commands,
            losses: tokio::sync::Mutex::new(losses),
        }
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| Error::DriverStopped)?;
        answer.await.map_err(|_| Error::DriverStopped)
    }

    /// Takes `keys`, and answers once each is held or refused. Bad input (an invalid key, one
    /// given twice or already in the set, too many) refuses the whole call with
    /// [`Error::KeySet`] and nothing is sent. Dropping the future does not call the acquisition
    /// off: the keys it asked for are still taken, and held by the set ([`held`](Self::held)),
    /// until released or the set is closed or dropped.
    pub async fn acquire<S: AsRef<str>>(&self, keys: &[S]) -> Result<Acquired, Error> {
        let keys = keys.iter().map(|k| k.as_ref().to_owned()).collect();
        self.ask(|reply| Command::Acquire { keys, reply }).await?
    }

    /// Gives back `keys` (each held), and answers once each is released, or found lost (its
    /// loss is reported by [`next_loss`](Self::next_loss)). A release Consul never confirmed
    /// answers [`Error::Lock`]: that key is freed when the session ends.
    pub async fn release<S: AsRef<str>>(&self, keys: &[S]) -> Result<(), Error> {
        let keys = Some(keys.iter().map(|k| k.as_ref().to_owned()).collect());
        self.ask(|reply| Command::Release { keys, reply }).await?
    }

    /// Gives back every held key, as [`release`](Self::release).
    pub async fn release_all(&self) -> Result<(), Error> {
        self.ask(|reply| Command::Release { keys: None, reply }).await?
    }

    /// The fencing tokens of the keys held now, in key order.
    pub async fn held(&self) -> Result<Vec<FencingToken>, Error> {
        self.ask(|reply| Command::Tokens { reply }).await
    }

    /// The next key lost, in the order the losses were found; `None` once the set is closed.
    pub async fn next_loss(&self) -> Option<KeyLoss> {
        self.losses.lock().await.recv().await
    }

    /// Closes the set: every key given back, the session destroyed. Later calls answer
    /// [`Error::DriverStopped`].
    pub async fn close(&self) {
        let _ = self.ask(|reply| Command::Close { reply }).await;
    }
}

/// Callers waiting for keys to end one way or another.
#[derive(Default)]
struct Waiters {
    acquires: Vec<AcquireWait>,
    /// Key → index in `acquires`.
    acquiring: HashMap<Key, usize>,
    releases: Vec<ReleaseWait>,
    releasing: HashMap<Key, usize>,
    close: Vec<oneshot::Sender<()>>,
}

struct AcquireWait {
    order: Vec<Key>,
    outcomes: HashMap<Key, Result<FencingToken, Refusal>>,
    reply: Option<oneshot::Sender<Result<Acquired, Error>>>,
}

struct ReleaseWait {
    left: usize,
    failed: Option<LockError>,
    reply: Option<oneshot::Sender<Result<(), Error>>>,
}

pub(crate) async fn run(
    machine: KeySetMachine,
    transport: Arc<Transport>,
    config: ClientConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    losses: mpsc::UnboundedSender<KeyLoss>,
) {
    let config = Arc::new(config);
    let mut machine = machine;
    let mut inflight = FuturesUnordered::new();
    let mut w = Waiters::default();
    let mut handles_gone = false;
    loop {
        while let Some(action) = machine.poll_action() {
            match action {
                Action::Send(t) => {
                    inflight.push(crate::transport::transmit(transport.clone(), config.clone(), t))
                }
                Action::Event(event) => on_event(&mut w, &losses, event),
            }
        }
        if handles_gone {
            if !machine.is_closed() {
                machine.close(Instant::now());
            }
            if machine.is_closed() || machine.is_quiescent() {
                break;
            }
        }
        let timer = machine.poll_timeout();
        tokio::select! {
            command = commands.recv(), if !handles_gone => match command {
                // Closed (by the handle or `Client::shutdown`): the task ends once the set is,
                // and later calls answer `DriverStopped`.
                Some(Command::Close { reply }) => {
                    w.close.push(reply);
                    handles_gone = true;
                }
                Some(command) => on_command(&mut machine, &mut w, command),
                None => handles_gone = true,
            },
            Some((id, reply)) = inflight.next(), if !inflight.is_empty() => {
                machine.handle_response(Instant::now(), id, reply);
            }
            () = sleep_until(timer), if timer.is_some() => machine.handle_timeout(Instant::now()),
        }
    }
    for reply in w.close.drain(..) {
        let _ = reply.send(());
    }
    tracing::debug!("key set task done");
}

fn on_command(machine: &mut KeySetMachine, w: &mut Waiters, command: Command) {
    let now = Instant::now();
    match command {
        Command::Acquire { keys, reply } => match machine.acquire(now, &keys) {
            Ok(()) => {
                let order: Vec<Key> = keys.iter().filter_map(|k| Key::new(k.as_str()).ok()).collect();
                let i = w.acquires.len();
                for key in &order {
                    w.acquiring.insert(key.clone(), i);
                }
                w.acquires.push(AcquireWait {
                    order,
                    outcomes: HashMap::new(),
                    reply: Some(reply),
                });
            }
            Err(e) => {
                let _ = reply.send(Err(Error::KeySet(e)));
            }
        },
        Command::Release { keys, reply } => {
            let keys: Vec<String> = match keys {
                Some(keys) => keys,
                None => machine.tokens().map(|t| t.key.as_str().to_owned()).collect(),
            };
            if keys.is_empty() {
                let _ = reply.send(Ok(()));
                return;
            }
            match machine.release(now, &keys) {
                Ok(()) => {
                    let i = w.releases.len();
                    for key in keys.iter().filter_map(|k| Key::new(k.as_str()).ok()) {
                        w.releasing.insert(key, i);
                    }
                    w.releases.push(ReleaseWait {
                        left: keys.len(),
                        failed: None,
                        reply: Some(reply),
                    });
                }
                Err(e) => {
                    let _ = reply.send(Err(Error::KeySet(e)));
                }
            }
        }
        Command::Tokens { reply } => {
            let _ = reply.send(machine.tokens().cloned().collect());
        }
        // Taken by the loop, which stops reading commands.
        Command::Close { reply } => w.close.push(reply),
    }
}

fn on_event(w: &mut Waiters, losses: &mpsc::UnboundedSender<KeyLoss>, event: KeySetEvent) {
    match event {
        KeySetEvent::Acquired(token) => {
            let key = token.key.clone();
            acquire_outcome(w, key, Ok(token));
        }
        KeySetEvent::Refused { key, reason } => acquire_outcome(w, key, Err(reason)),
        KeySetEvent::Lost { key, reason } => {
            release_outcome(w, &key, None);
            let _ = losses.send(KeyLoss { key, reason });
        }
        KeySetEvent::Released(key) => release_outcome(w, &key, None),
        KeySetEvent::ReleaseFailed { key, error } => release_outcome(w, &key, Some(error)),
        KeySetEvent::SessionLost(reason) => {
            tracing::warn!(?reason, "key set: session lost; every key it held is lost");
        }
        KeySetEvent::Retrying(retry) => tracing::debug!(?retry, "key set: retrying"),
        KeySetEvent::Closed => {}
    }
}

fn acquire_outcome(w: &mut Waiters, key: Key, outcome: Result<FencingToken, Refusal>) {
    let Some(i) = w.acquiring.remove(&key) else {
        return;
    };
    let wait = &mut w.acquires[i];
    wait.outcomes.insert(key, outcome);
    if wait.outcomes.len() < wait.order.len() {
        return;
    }
    let mut done = Acquired::default();
    for key in &wait.order {
        match wait.outcomes.remove(key) {
            Some(Ok(token)) => done.held.push(token),
            Some(Err(reason)) => done.refused.push((key.clone(), reason)),
            None => {}
        }
    }
    if let Some(reply) = wait.reply.take() {
        let _ = reply.send(Ok(done));
    }
    if w.acquiring.is_empty() {
        w.acquires.clear();
    }
}

fn release_outcome(w: &mut Waiters, key: &Key, failed: Option<LockError>) {
    let Some(i) = w.releasing.remove(key) else {
        return;
    };
    let wait = &mut w.releases[i];
    wait.left = wait.left.saturating_sub(1);
    if failed.is_some() {
        wait.failed = failed;
    }
    if wait.left == 0 {
        if let Some(reply) = wait.reply.take() {
            let _ = reply.send(match wait.failed.take() {
                None => Ok(()),
                Some(e) => Err(Error::Lock(e)),
            });
        }
    }
    if w.releasing.is_empty() {
        w.releases.clear();
    }
}

impl From<KeySetError> for Error {
    fn from(e: KeySetError) -> Error {
        Error::KeySet(e)
    }
}
