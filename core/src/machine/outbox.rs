//! What the machines hand to a driver: requests to send and events to report, correlated by id.

use std::collections::VecDeque;
use std::fmt;
use std::time::Instant;

use crate::api::{ClientConfig, Endpoint, RequestClass};

/// Names one request a machine sent, so that its reply finds its way back.
///
/// Ids are never reused by a machine; a reply to an id the machine no longer waits for (an
/// abandoned or timed-out request) is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A request for the driver to send.
#[derive(Debug)]
pub struct Transmit {
    /// Pass this back with the reply.
    pub id: RequestId,
    /// The request, ready to go.
    pub request: http::Request<Vec<u8>>,
    /// Give up on the request at this instant (and report [`TransportErrorKind::Timeout`]).
    /// If the driver reports nothing by then, the machine treats the request as timed out
    /// itself, so a driver that loses a request can't wedge the machine.
    pub deadline: Instant,
    /// Whether the agent may hold the request (a blocking read) or answers it at once: a driver
    /// that bounds its connections keeps room for prompt requests, which the hold's safety
    /// depends on (renewals), that blocking reads can't take. A driver may shorten a blocking
    /// read's wait ([`shorten_wait`](crate::api::shorten_wait)) so that reads take turns; the
    /// machine takes a read answered without news after at least
    /// [`QUICK_ANSWER`](crate::machine::QUICK_ANSWER) as a normal one.
    pub class: RequestClass,
}

/// What a machine asks of its driver.
// Boxing the request would cost an allocation per request to save a copy of a few hundred bytes
// per action, which is moved out at once.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Action<E> {
    /// Send a request.
    Send(Transmit),
    /// Tell the user something.
    Event(E),
}

/// Why a request got no HTTP reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportErrorKind {
    /// The deadline passed.
    Timeout,
    /// No connection could be made (refused, unreachable, DNS).
    Connect,
    /// The connection failed part way (reset, closed, TLS failure, bad HTTP).
    Io,
    /// The reply body exceeded [`MAX_REPLY_BYTES`](crate::api::MAX_REPLY_BYTES).
    TooLarge,
    /// The TLS handshake failed in a way that asking again with the same settings can't fix:
    /// the agent's certificate is not trusted or does not name the host, the agent refused our
    /// (missing) client certificate, or the other side does not speak TLS. The driver, which
    /// sees the TLS library's error, says so; the machines take it as fatal.
    TlsRefused,
}

/// A request that got no HTTP reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct TransportError {
    /// The kind of failure.
    pub kind: TransportErrorKind,
    /// The transport's description, for logs.
    pub message: String,
}

impl TransportError {
    /// A transport error of `kind`.
    pub fn new(kind: TransportErrorKind, message: impl Into<String>) -> TransportError {
        TransportError {
            kind,
            message: message.into(),
        }
    }
}

/// The outcome of one request: Consul's reply, or why there was none.
pub type Reply = Result<http::Response<Vec<u8>>, TransportError>;

/// The queue of actions and the id counter, shared by a machine and the sub-machines it uses so
/// that ids stay unique across all of them.
#[derive(Debug)]
pub(crate) struct Outbox<E> {
    next_id: u64,
    queue: VecDeque<Action<E>>,
    pub(crate) config: ClientConfig,
}

impl<E> Outbox<E> {
    pub(crate) fn new(config: ClientConfig) -> Outbox<E> {
        Outbox {
            next_id: 1,
            queue: VecDeque::new(),
            config,
        }
    }

    /// Queues `endpoint` for sending, giving its id.
    pub(crate) fn send(&mut self, endpoint: &impl Endpoint, deadline: Instant) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let request = endpoint.encode(&self.config);
        tracing::trace!(%id, method = %request.method(), uri = %request.uri(), "send");
        self.queue.push_back(Action::Send(Transmit {
            id,
            request,
            deadline,
            class: endpoint.class(),
        }));
        id
    }

    pub(crate) fn event(&mut self, event: E) {
        self.queue.push_back(Action::Event(event));
    }

    pub(crate) fn pop(&mut self) -> Option<Action<E>> {
        self.queue.pop_front()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// One outstanding request: its id and when the machine stops waiting for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub(crate) id: RequestId,
    pub(crate) sent_at: Instant,
    pub(crate) deadline: Instant,
}

impl Pending {
    pub(crate) fn is(&self, id: RequestId) -> bool {
        self.id == id
    }
}

/// The requests a machine is waiting for, gathered to check their deadlines. They are gathered
/// on every timeout and every `poll_timeout`, where a `Vec` cost a heap allocation each time (the
/// core benchmark), and a machine has only a handful outstanding (its session's, its phase's, a
/// stray reply's), so they are kept inline.
#[derive(Debug, Default)]
pub struct Pendings {
    inline: [Option<Pending>; Pendings::INLINE],
    /// More than fit inline, should a machine ever have them: none is ever dropped.
    spill: Vec<Pending>,
}

impl Pendings {
    /// Today's machines have at most four.
    const INLINE: usize = 6;

    pub(crate) fn push(&mut self, pending: Pending) {
        match self.inline.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => *slot = Some(pending),
            None => self.spill.push(pending),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = Pending> + '_ {
        self.inline.iter().flatten().chain(&self.spill).copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.iter().count()
    }
}

impl Extend<Pending> for Pendings {
    fn extend<I: IntoIterator<Item = Pending>>(&mut self, pendings: I) {
        for pending in pendings {
            self.push(pending);
        }
    }
}
