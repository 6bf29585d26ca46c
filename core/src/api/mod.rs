//! The typed Consul HTTP API that the lock and semaphore need, as pure encode and decode
//! functions: each request type implements [`Endpoint`], turning into an
//! `http::Request<Vec<u8>>` for a [`ClientConfig`] and decoding its `http::Response<Vec<u8>>`.
//! All knowledge of Consul's wire lives here, so that drivers only move bytes.

pub mod config;
pub mod env;
pub mod key;
pub mod kv;
pub mod reply;
pub mod request;
pub mod session;
pub mod txn;

pub use config::{Address, ClientConfig, InvalidToken, Scheme, TlsConfig, Token};
pub use env::ConfigError;
pub use key::{Key, KeyError};
pub use kv::{KvAcquire, KvCasDelete, KvCasPut, KvDelete, KvGet, KvList, KvPair, KvRelease};
pub use reply::{ApiError, MAX_REPLY_BYTES, QueryMeta, QueryReply};
pub use request::{Blocking, Consistency, Endpoint, RequestClass, shorten_wait};
pub use session::{
    InvalidSessionId, SessionBehavior, SessionCreate, SessionDestroy, SessionEntry, SessionId, SessionInfo,
    SessionRenew,
};
pub use txn::{
    BatchOutcome, BatchVerb, EnqueueOutcome, KvBatchTxn, KvDequeueLockTxn, KvEnqueueTxn, KvLockTxn,
    KvProclaimTxn, Line, LockRefusal, LockTxnOutcome, MAX_TXN_OPS,
};
