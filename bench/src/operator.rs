//! The suite's own requests to the agent: operator actions (destroying a holder's session) and
//! the protocol floor, made with plain typed requests and no lock machine.

use std::time::Duration;

use consul_lock_core::api::{
    Blocking, ClientConfig, Endpoint, Key, KvAcquire, KvGet, KvRelease, SessionCreate, SessionDestroy,
    SessionId,
};
use consul_lock_core::machine::LOCK_FLAG_VALUE;
use consul_lock_tokio::Client;
use tokio::runtime::Runtime;

use crate::error::BenchError;
use crate::protocol::now_ns;

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

    /// The protocol floor of a handoff, `rounds` times: two sessions pass `key` back and forth
    /// with the fewest requests the protocol allows: the waiter parks in a blocking read of the
    /// key, the holder releases, the read returns, the waiter acquires. Each sample is the time
    /// from just before the release is sent to the acquire's answer, in milliseconds.
    pub fn handoff_floor(&self, key: &str, rounds: usize, park: Duration) -> Result<Vec<f64>, BenchError> {
        let key = Key::new(key).map_err(|e| BenchError::Request {
            what: "the floor's key",
            msg: e.to_string(),
        })?;
        let session = |_| {
            let create = SessionCreate {
                ttl: Some(Duration::from_secs(60)),
                lock_delay: Some(Duration::ZERO),
                ..SessionCreate::default()
            };
            self.call("creating a floor session", &create)
        };
        let mut holder = session(0)?;
        let mut waiter = session(1)?;
        if !self.call("the floor's first acquire", &acquire(&key, &holder))? {
            return Err(BenchError::Request {
                what: "the floor's first acquire",
                msg: "refused".to_owned(),
            });
        }
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let parked = self
                .runtime
                .spawn(take_when_free(self.client.clone(), key.clone(), waiter.clone()));
            std::thread::sleep(park);
            let sent = now_ns();
            self.call("the floor's release", &release(&key, &holder))?;
            let taken = self.runtime.block_on(parked).map_err(|e| BenchError::Request {
                what: "the floor's waiter",
                msg: e.to_string(),
            })??;
            samples.push(crate::stats::ms_between(sent, taken));
            std::mem::swap(&mut holder, &mut waiter);
        }
        self.call("the floor's last release", &release(&key, &holder))?;
        for s in [holder, waiter] {
            self.call("destroying a floor session", &SessionDestroy { id: s })?;
        }
        Ok(samples)
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
async fn take_when_free(client: Client, key: Key, session: SessionId) -> Result<u64, BenchError> {
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
    let taken = client
        .call(&acquire(&key, &session), REQUEST_TIMEOUT)
        .await
        .map_err(|e| failed("the floor's acquire", e.to_string()))?;
    let at = now_ns();
    if taken {
        Ok(at)
    } else {
        Err(failed("the floor's acquire", "refused".to_owned()))
    }
}
