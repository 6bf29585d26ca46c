//! The suite's own requests to the agent: operator actions (destroying a holder's session) and
//! the protocol floor, made with plain typed requests and no lock machine.

use std::time::Duration;

use consul_lock_core::api::{
    Blocking, ClientConfig, Endpoint, Key, KvAcquire, KvDelete, KvGet, KvLockTxn, KvRelease, LockTxnOutcome,
    SessionCreate, SessionDestroy, SessionId,
};
use consul_lock_core::machine::LOCK_FLAG_VALUE;
use consul_lock_tokio::Client;
use tokio::runtime::Runtime;

use crate::error::BenchError;
use crate::protocol::now_ns;

/// How the floor's waiter takes the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FloorAcquire {
    /// `PUT /v1/kv/<key>?acquire=`, as Go's lock does.
    Kv,
    /// `PUT /v1/txn` with one KV `lock` operation, as ours does.
    Txn,
}

/// The deadline of the suite's non-blocking requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for the suite's own requests.
pub struct Operator {
    runtime: Runtime,
    client: Client,
}

impl Operator {
    /// An operator for the agent at `config`.
    pub fn new(config: ClientConfig) -> Result<Operator, BenchError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|source| BenchError::Io {
                what: "starting the operator's runtime".to_owned(),
                source,
            })?;
        let client = Client::new(config).map_err(|e| BenchError::Request {
            what: "building the operator's client",
            msg: e.to_string(),
        })?;
        Ok(Operator { runtime, client })
    }

    fn call<E: Endpoint>(&self, what: &'static str, endpoint: &E) -> Result<E::Output, BenchError> {
        self.runtime
            .block_on(self.client.call(endpoint, REQUEST_TIMEOUT))
            .map_err(|e| BenchError::Request {
                what,
                msg: e.to_string(),
            })
    }

    /// Destroys a session: its locks are released, and its keys refuse new holders for its
    /// lock-delay (an operator's `consul session destroy`, or a failed node).
    pub fn destroy_session(&self, session: &str) -> Result<(), BenchError> {
        let id = SessionId::new(session).map_err(|e| BenchError::Request {
            what: "destroying a session",
            msg: e.to_string(),
        })?;
        self.call("destroying a session", &SessionDestroy { id })
            .map(|_| ())
    }

    /// Deletes a key, held or not (an operator's `consul kv delete`): its holder's monitor
    /// should report the lock lost.
    pub fn delete_key(&self, key: &str) -> Result<(), BenchError> {
        let key = Key::new(key).map_err(|e| BenchError::Request {
            what: "deleting a key",
            msg: e.to_string(),
        })?;
        self.call("deleting a key", &KvDelete { key }).map(|_| ())
    }

    /// The protocol floor of a handoff: two sessions pass `key` back and forth with the fewest
    /// requests the protocol allows, through `via`. See [`Floor::round`].
    pub fn floor(&self, key: &str, via: FloorAcquire) -> Result<Floor<'_>, BenchError> {
        let key = Key::new(key).map_err(|e| BenchError::Request {
            what: "the floor's key",
            msg: e.to_string(),
        })?;
        let session = || {
            // Never renewed: a TTL longer than any run (the sessions are destroyed at the end).
            // With 60 s, a handoff scenario of four clients (six series of 100 rounds) outlived
            // them and the floor's acquire was refused for an invalid session.
            let create = SessionCreate {
                ttl: Some(Duration::from_secs(86_400)),
                lock_delay: Some(Duration::ZERO),
                ..SessionCreate::default()
            };
            self.call("creating a floor session", &create)
        };
        let (holder, waiter) = (session()?, session()?);
        if !self.call("the floor's first acquire", &acquire(&key, &holder))? {
            return Err(BenchError::Request {
                what: "the floor's first acquire",
                msg: "refused".to_owned(),
            });
        }
        Ok(Floor {
            operator: self,
            key,
            holder,
            waiter,
            via,
        })
    }
}

/// Two sessions passing a key back and forth by hand ([`Operator::floor`]).
pub struct Floor<'a> {
    operator: &'a Operator,
    key: Key,
    holder: SessionId,
    waiter: SessionId,
    via: FloorAcquire,
}

impl Floor<'_> {
    /// One handoff: the waiter parks in a blocking read of the key, `park` later the holder
    /// releases, the read returns, the waiter acquires; then they swap. The time from just before
    /// the release is sent to the acquire's answer, in milliseconds.
    pub fn round(&mut self, park: Duration) -> Result<f64, BenchError> {
        let op = self.operator;
        let parked = op.runtime.spawn(take_when_free(
            op.client.clone(),
            self.key.clone(),
            self.waiter.clone(),
            self.via,
        ));
        std::thread::sleep(park);
        let sent = now_ns();
        op.call("the floor's release", &release(&self.key, &self.holder))?;
        let taken = op.runtime.block_on(parked).map_err(|e| BenchError::Request {
            what: "the floor's waiter",
            msg: e.to_string(),
        })??;
        std::mem::swap(&mut self.holder, &mut self.waiter);
        Ok(crate::stats::ms_between(sent, taken))
    }

    /// Releases the key and destroys both sessions.
    pub fn finish(self) -> Result<(), BenchError> {
        let op = self.operator;
        op.call("the floor's last release", &release(&self.key, &self.holder))?;
        for id in [self.holder, self.waiter] {
            op.call("destroying a floor session", &SessionDestroy { id })?;
        }
        Ok(())
    }
}

fn acquire(key: &Key, session: &SessionId) -> KvAcquire {
    KvAcquire {
        key: key.clone(),
        session: session.clone(),
        flags: LOCK_FLAG_VALUE,
        value: Vec::new(),
    }
}

fn release(key: &Key, session: &SessionId) -> KvRelease {
    KvRelease {
        key: key.clone(),
        session: session.clone(),
        flags: LOCK_FLAG_VALUE,
        value: Vec::new(),
    }
}

/// The waiter's side of the floor: block on the key until it is free, then take it. Returns
/// when the acquire was answered.
async fn take_when_free(
    client: Client,
    key: Key,
    session: SessionId,
    via: FloorAcquire,
) -> Result<u64, BenchError> {
    let failed = |what, msg: String| BenchError::Request { what, msg };
    let mut read = KvGet::new(key.clone());
    loop {
        let reply = client
            .call(&read, Duration::from_secs(70))
            .await
            .map_err(|e| failed("the floor's blocking read", e.to_string()))?;
        if reply.value.as_ref().is_none_or(|pair| pair.session.is_none()) {
            break;
        }
        read.blocking = Some(Blocking {
            index: reply.meta.index,
            wait: Duration::from_secs(60),
        });
    }
    let taken = match via {
        FloorAcquire::Kv => client.call(&acquire(&key, &session), REQUEST_TIMEOUT).await,
        FloorAcquire::Txn => {
            let lock = KvLockTxn {
                key: key.clone(),
                session: session.clone(),
                flags: LOCK_FLAG_VALUE,
                value: Vec::new(),
            };
            let outcome = client.call(&lock, REQUEST_TIMEOUT).await;
            outcome.map(|o| matches!(o, LockTxnOutcome::Locked(_)))
        }
    }
    .map_err(|e| failed("the floor's acquire", e.to_string()))?;
    let at = now_ns();
    if taken {
        Ok(at)
    } else {
        Err(failed("the floor's acquire", "refused".to_owned()))
    }
}
