//! A fault-injecting TCP proxy for tests: put it between a client and a Consul agent on loopback,
//! then pass bytes through, drop them all (a partition), refuse connections, or answer chosen
//! requests with `500 Internal Server Error`, switching at any moment.
//!
//! ```no_run
//! # use consul_lock_sim::proxy::{FaultProxy, Mode};
//! # let agent_addr: std::net::SocketAddr = "127.0.0.1:8500".parse().unwrap();
//! let proxy = FaultProxy::start(agent_addr).unwrap();
//! let config = proxy.config(); // give this to the client under test
//! proxy.set_mode(Mode::BlackHole); // nothing goes through now, and nothing is refused
//! proxy.set_mode(Mode::Pass); // new connections work; black-holed ones stay dead
//! proxy.fail_next_gets(2); // the next two GETs answer 500
//! ```
//!
//! How it works: each accepted connection gets a thread that reads the client's HTTP/1.1
//! requests one at a time (request line, headers, a `Content-Length` or chunked body) and decides
//! for each: drop it, answer it with an injected 500, or forward its bytes over the connection's
//! own upstream connection (opened on first use). A second thread relays whatever the agent sends
//! back, byte for byte. Clients that don't pipeline (reqwest, hyper, curl) see every answer in
//! order. Everything is plain `std` threads; dropping the proxy closes the listener and every
//! connection, and the threads end.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;

use crate::http1::read_request;

/// How long connecting to the upstream may take.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `Drop` waits for the proxy's threads to end before leaving them be.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// The body of an injected 500.
const INJECTED_BODY: &str = "fault injected by the test proxy";

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways (and apply the HTTP faults armed with
    /// [`fail_requests`](FaultProxy::fail_requests)).
    Pass,
    /// A partition that drops packets: connections, old and new, stay open and are accepted, but
    /// every byte is dropped in both directions. Connections that lived through a black hole stay
    /// dead after it ends (they lost bytes); new ones work again.
    BlackHole,
    /// Close new connections at once; switching to it cuts the existing ones.
    Refuse,
}

pub use crate::http1::RequestHead;

/// What became of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sent on to the agent.
    Forwarded,
    /// Answered by the proxy with a 500.
    Injected,
    /// Dropped: its connection is black-holed.
    Dropped,
    /// Its connection was cut (refused, or the upstream could not be reached).
    Cut,
}

/// One request the proxy read, and what it did with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    /// When it was read in full.
    pub at: Instant,
    /// Its head.
    pub head: RequestHead,
    /// What the proxy did with it.
    pub outcome: Outcome,
}

/// How much traffic the proxy has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections accepted and served.
    pub connections: u64,
    /// Connections closed at once ([`Mode::Refuse`]).
    pub refused: u64,
    /// Requests read in full.
    pub requests: u64,
    /// Requests forwarded to the agent.
    pub forwarded: u64,
    /// Requests answered with an injected 500.
    pub injected: u64,
    /// Requests dropped by a black hole.
    pub dropped: u64,
}

type Predicate = Box<dyn Fn(&RequestHead) -> bool + Send + Sync>;

struct Rule {
    matches: Predicate,
    remaining: u64,
}

struct ModeState {
    mode: Mode,
    /// Bumped each time a black hole starts: a connection born before the latest one lost bytes.
    black_holes: u64,
}

#[derive(Default)]
struct Atomics {
    connections: AtomicU64,
    refused: AtomicU64,
    requests: AtomicU64,
    forwarded: AtomicU64,
    injected: AtomicU64,
    dropped: AtomicU64,
}

struct Shared {
    upstream: SocketAddr,
    mode: Mutex<ModeState>,
    rules: Mutex<Vec<Rule>>,
    conns: Mutex<Vec<Weak<Conn>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    seen: Mutex<Vec<SeenRequest>>,
    counters: Atomics,
    stopping: AtomicBool,
    /// Added before each request is forwarded.
    latency: Mutex<Duration>,
}

/// Locks `mutex`, taking the data even if a thread panicked while holding it: a test proxy must
/// keep going (and stop) whatever happened elsewhere.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn mode(&self) -> Mode {
        lock(&self.mode).mode
    }

    fn counter(&self, outcome: Outcome) -> Option<&AtomicU64> {
        match outcome {
            Outcome::Forwarded => Some(&self.counters.forwarded),
            Outcome::Injected => Some(&self.counters.injected),
            Outcome::Dropped => Some(&self.counters.dropped),
            Outcome::Cut => None,
        }
    }

    /// Records a request (before acting on it, so that whoever gets the answer finds it
    /// recorded); returns its place in the log.
    fn record(&self, head: RequestHead, outcome: Outcome) -> usize {
        if let Some(counter) = self.counter(outcome) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut seen = lock(&self.seen);
        seen.push(SeenRequest {
            at: Instant::now(),
            head,
            outcome,
        });
        seen.len() - 1
    }

    /// Corrects the outcome of the request recorded at `at`.
    fn amend(&self, at: usize, outcome: Outcome) {
        let mut seen = lock(&self.seen);
        let Some(entry) = seen.get_mut(at) else { return };
        if let Some(counter) = self.counter(entry.outcome) {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(counter) = self.counter(outcome) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        entry.outcome = outcome;
    }

    /// Takes one armed fault matching `head`, if any.
    fn take_fault(&self, head: &RequestHead) -> bool {
        let mut rules = lock(&self.rules);
        let Some(i) = rules.iter().position(|r| r.remaining > 0 && (r.matches)(head)) else {
            return false;
        };
        rules[i].remaining -= 1;
        if rules[i].remaining == 0 {
            rules.remove(i);
        }
        true
    }

    fn live_conns(&self) -> Vec<Arc<Conn>> {
        let mut conns = lock(&self.conns);
        conns.retain(|c| c.strong_count() > 0);
        conns.iter().filter_map(Weak::upgrade).collect()
    }

    fn spawn(&self, name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let handle = thread::Builder::new().name(name.to_owned()).spawn(f)?;
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
        Ok(())
    }
}

/// One client connection and its upstream.
struct Conn {
    client: TcpStream,
    /// Serialises writes to the client (the relay and injected answers).
    write: Mutex<()>,
    upstream: Mutex<Option<Arc<TcpStream>>>,
    /// Set once the connection lost bytes to a black hole (or was cut): nothing goes through
    /// any more.
    dead: AtomicBool,
    /// The black-hole count when it was accepted.
    born: u64,
}

impl Conn {
    /// Whether bytes must be dropped now: the proxy is a black hole, or was one since this
    /// connection was accepted.
    fn is_dead(&self, shared: &Shared) -> bool {
        if self.dead.load(Ordering::SeqCst) {
            return true;
        }
        let state = lock(&shared.mode);
        if state.mode == Mode::BlackHole || state.black_holes > self.born {
            self.dead.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }

    fn write_client(&self, bytes: &[u8]) -> io::Result<()> {
        let _serial = lock(&self.write);
        (&self.client).write_all(bytes)
    }

    /// Closes both sides at once, waking the threads blocked on them.
    fn cut(&self) {
        self.dead.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(upstream) = lock(&self.upstream).as_ref() {
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

/// A loopback TCP proxy in front of an agent, with faults switchable at runtime. Stops (listener
/// closed, connections cut, threads ended) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("mode", &self.shared.mode())
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port, forwarding to `upstream`, in [`Mode::Pass`].
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            mode: Mutex::new(ModeState {
                mode: Mode::Pass,
                black_holes: 0,
            }),
            rules: Mutex::new(Vec::new()),
            conns: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            counters: Atomics::default(),
            latency: Mutex::new(Duration::ZERO),
            stopping: AtomicBool::new(false),
        });
        let accept = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("fault-proxy-accept".to_owned())
                .spawn(move || accept_loop(&listener, &shared))?
        };
        Ok(FaultProxy {
            addr,
            shared,
            listener: Some(accept),
        })
    }

    /// The proxy's address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// A client config pointing at the proxy, everything else at its defaults.
    ///
    /// # Panics
    ///
    /// Never in practice: a loopback `IP:PORT` is always a valid address.
    pub fn config(&self) -> ClientConfig {
        #[allow(clippy::expect_used)]
        ClientConfig::http(&self.addr.to_string()).expect("a loopback address is a valid agent address")
    }

    /// The mode in force.
    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// Switches mode. [`Mode::BlackHole`] marks every existing connection dead;
    /// [`Mode::Refuse`] cuts them.
    pub fn set_mode(&self, mode: Mode) {
        {
            let mut state = lock(&self.shared.mode);
            if mode == Mode::BlackHole && state.mode != Mode::BlackHole {
                state.black_holes += 1;
            }
            state.mode = mode;
        }
        if mode == Mode::Refuse {
            for conn in self.shared.live_conns() {
                conn.cut();
            }
        }
    }

    /// Delays every request by `latency` before forwarding it (zero: no delay).
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.shared.latency) = latency;
    }

    /// Answers the next `n` GET requests with a 500 (in [`Mode::Pass`]).
    pub fn fail_next_gets(&self, n: u64) {
        self.fail_requests(|head| head.method == "GET", n);
    }

    /// Answers the next `n` requests that `matching` accepts with a 500 (in [`Mode::Pass`]).
    /// Faults armed earlier are used first when several match.
    pub fn fail_requests(&self, matching: impl Fn(&RequestHead) -> bool + Send + Sync + 'static, n: u64) {
        if n > 0 {
            lock(&self.shared.rules).push(Rule {
                matches: Box::new(matching),
                remaining: n,
            });
        }
    }

    /// Disarms every fault armed with [`fail_requests`](Self::fail_requests).
    pub fn clear_faults(&self) {
        lock(&self.shared.rules).clear();
    }

    /// How many injections are still armed.
    pub fn armed_faults(&self) -> u64 {
        lock(&self.shared.rules).iter().map(|r| r.remaining).sum()
    }

    /// The traffic counters.
    pub fn counters(&self) -> Counters {
        let c = &self.shared.counters;
        Counters {
            connections: c.connections.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            forwarded: c.forwarded.load(Ordering::Relaxed),
            injected: c.injected.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }

    /// Every request read so far, oldest first.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.shared.seen).clone()
    }

    /// How many requests read so far `matching` accepts.
    pub fn count(&self, matching: impl Fn(&SeenRequest) -> bool) -> usize {
        lock(&self.shared.seen).iter().filter(|s| matching(s)).count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(listener) = self.listener.take() {
            let _ = listener.join();
        }
        for conn in self.shared.live_conns() {
            conn.cut();
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        let deadline = Instant::now() + STOP_WAIT;
        for thread in threads {
            while !thread.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(client) = stream else { continue };
        let (mode, born) = {
            let state = lock(&shared.mode);
            (state.mode, state.black_holes)
        };
        if mode == Mode::Refuse {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let _ = client.set_nodelay(true);
        let Ok(reader) = client.try_clone() else { continue };
        let conn = Arc::new(Conn {
            client,
            write: Mutex::new(()),
            upstream: Mutex::new(None),
            dead: AtomicBool::new(mode == Mode::BlackHole),
            born,
        });
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        lock(&shared.conns).push(Arc::downgrade(&conn));
        let shared2 = shared.clone();
        // A thread that can't be spawned drops the connection, which the client sees as cut.
        let _ = shared.spawn("fault-proxy-client", move || serve(&shared2, &conn, reader));
    }
}

/// Reads the client's requests one by one and deals with each.
fn serve(shared: &Arc<Shared>, conn: &Arc<Conn>, reader: TcpStream) {
    let mut reader = BufReader::new(reader);
    // Until the end of the connection, or bytes that are not HTTP: then close it.
    while let Ok(Some(request)) = read_request(&mut reader) {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        if conn.is_dead(shared) {
            shared.record(request.head, Outcome::Dropped);
            continue;
        }
        match shared.mode() {
            // Refuse cut this connection already; a request read just before is cut with it.
            Mode::Refuse => {
                shared.record(request.head, Outcome::Cut);
                break;
            }
            // Seen by `is_dead` above; kept for completeness.
            Mode::BlackHole => {
                shared.record(request.head, Outcome::Dropped);
                continue;
            }
            Mode::Pass => {}
        }
        if shared.take_fault(&request.head) {
            shared.record(request.head, Outcome::Injected);
            let answer = format!(
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: {}\r\n\r\n{INJECTED_BODY}",
                INJECTED_BODY.len()
            );
            if conn.write_client(answer.as_bytes()).is_err() {
                break;
            }
            continue;
        }
        let latency = *lock(&shared.latency);
        if !latency.is_zero() {
            thread::sleep(latency);
        }
        let at = shared.record(request.head, Outcome::Forwarded);
        if forward(shared, conn, &request.raw).is_err() {
            shared.amend(at, Outcome::Cut);
            break;
        }
    }
    // The client closed the connection (or it was cut, or the proxy stops): close the upstream
    // side too, which ends the relay thread.
    conn.cut();
}

/// Sends a request's bytes upstream, connecting (and starting the relay back) on first use.
fn forward(shared: &Arc<Shared>, conn: &Arc<Conn>, raw: &[u8]) -> io::Result<()> {
    let existing = lock(&conn.upstream).clone();
    let upstream = match existing {
        Some(upstream) => upstream,
        None => {
            let upstream = TcpStream::connect_timeout(&shared.upstream, UPSTREAM_CONNECT_TIMEOUT)?;
            let _ = upstream.set_nodelay(true);
            let back = upstream.try_clone()?;
            let upstream = Arc::new(upstream);
            *lock(&conn.upstream) = Some(upstream.clone());
            if conn.dead.load(Ordering::SeqCst) {
                // Cut while connecting.
                let _ = upstream.shutdown(Shutdown::Both);
            }
            let (shared2, conn2) = (shared.clone(), conn.clone());
            shared.spawn("fault-proxy-relay", move || relay_back(&shared2, &conn2, back))?;
            upstream
        }
    };
    (&*upstream).write_all(raw)
}

/// Relays the agent's bytes to the client, dropping them once the connection is dead.
fn relay_back(shared: &Shared, conn: &Conn, mut upstream: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match upstream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if conn.is_dead(shared) {
            continue;
        }
        if conn.write_client(&buf[..n]).is_err() {
            break;
        }
    }
    // The agent closed the connection: tell the client, unless a partition hides it.
    if !conn.is_dead(shared) {
        conn.cut();
    }
}
