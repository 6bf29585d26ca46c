//! [`SimConsul`] served over real HTTP on a loopback port, on the wall clock: for driver tests
//! and demos that need a Consul without a Consul binary. For faults (black hole, refused
//! connections, 500s, latency), put a [`FaultProxy`](crate::proxy::FaultProxy) in front.
//!
//! ```no_run
//! # use consul_lock_sim::SimServer;
//! let server = SimServer::start(7).unwrap();
//! let config = server.config(); // give this to a driver
//! // An operator destroys every session, as `consul` would let them.
//! server.with_sim(|sim, now| {
//!     let ids: Vec<String> = sim.sessions().map(|s| s.id.clone()).collect();
//!     for id in ids {
//!         sim.destroy_session(now, &id);
//!     }
//! });
//! ```

use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;

use crate::http1::read_request;
use crate::{QueryId, SimConsul, SimReply};

/// How often the clock thread wakes at most, to expire sessions and end blocking waits.
const TICK: Duration = Duration::from_millis(10);

type Waiters = HashMap<QueryId, mpsc::Sender<http::Response<Vec<u8>>>>;

struct Shared {
    /// Lock order: `sim`, then `waiters`.
    sim: Mutex<SimConsul>,
    waiters: Mutex<Waiters>,
    stopping: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Collects the parked reads `advance` answers and hands each to its connection.
    fn advance(&self, sim: &mut SimConsul, now: Instant) {
        let woken = sim.advance(now);
        let mut waiters = lock(&self.waiters);
        for (query, response) in woken {
            if let Some(waiter) = waiters.remove(&query) {
                // The connection may be gone; then nobody wants the answer.
                let _ = waiter.send(response);
            }
        }
    }
}

/// A [`SimConsul`] listening on a loopback port. Stops accepting when dropped.
pub struct SimServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimServer {
    /// Starts a simulator seeded with `seed` on a free loopback port.
    pub fn start(seed: u64) -> io::Result<SimServer> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            sim: Mutex::new(SimConsul::new(seed, Instant::now())),
            waiters: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        });
        let accept = shared.clone();
        thread::Builder::new()
            .name("sim-server-accept".into())
            .spawn(move || accept_loop(&listener, &accept))?;
        let clock = shared.clone();
        thread::Builder::new()
            .name("sim-server-clock".into())
            .spawn(move || clock_loop(&clock))?;
        Ok(SimServer { addr, shared })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client config pointing at it.
    pub fn config(&self) -> ClientConfig {
        ClientConfig::http(&self.addr.to_string()).unwrap_or_default()
    }

    /// Runs `f` on the simulator at the current time (to inspect it, or act as an operator),
    /// then answers the reads that woke.
    pub fn with_sim<R>(&self, f: impl FnOnce(&mut SimConsul, Instant) -> R) -> R {
        let now = Instant::now();
        let mut sim = lock(&self.shared.sim);
        let result = f(&mut sim, now);
        self.shared.advance(&mut sim, now);
        result
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let shared = shared.clone();
        let spawned = thread::Builder::new()
            .name("sim-server-conn".into())
            .spawn(move || serve(&shared, stream));
        if spawned.is_err() {
            tracing::warn!("sim server: could not start a connection thread");
        }
    }
}

fn clock_loop(shared: &Shared) {
    while !shared.stopping.load(Ordering::SeqCst) {
        let next = {
            let mut sim = lock(&shared.sim);
            let now = Instant::now();
            shared.advance(&mut sim, now);
            sim.poll_timeout()
        };
        let pause = next.map_or(TICK, |at| at.saturating_duration_since(Instant::now()).min(TICK));
        thread::sleep(pause.max(Duration::from_millis(1)));
    }
}

fn serve(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(reader) = stream.try_clone() else { return };
    let mut reader = BufReader::new(reader);
    let mut writer = stream;
    while let Ok(Some(request)) = read_request(&mut reader) {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let response = match to_http(&request) {
            Some(http_request) => answer(shared, &http_request),
            None => plain(400, "malformed request (chunked bodies are not supported)"),
        };
        if write_response(&mut writer, &response).is_err() {
            break;
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
}

fn to_http(request: &crate::http1::Request) -> Option<http::Request<Vec<u8>>> {
    let mut builder = http::Request::builder()
        .method(request.head.method.as_str())
        .uri(format!("http://sim{}", request.head.target));
    for (name, value) in &request.head.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder.body(request.plain_body()?.to_vec()).ok()
}

/// The simulator's answer: at once, or once a blocking read wakes.
fn answer(shared: &Shared, request: &http::Request<Vec<u8>>) -> http::Response<Vec<u8>> {
    let parked = {
        let now = Instant::now();
        let mut sim = lock(&shared.sim);
        let reply = sim.handle(now, request);
        let parked = match reply {
            SimReply::Now(response) => {
                shared.advance(&mut sim, now);
                return response;
            }
            SimReply::Parked(query) => {
                // Registered before the lock is let go, so no wake-up can come first.
                let (tx, rx) = mpsc::channel();
                lock(&shared.waiters).insert(query, tx);
                rx
            }
        };
        shared.advance(&mut sim, now);
        parked
    };
    parked
        .recv()
        .unwrap_or_else(|_| plain(500, "the simulator stopped"))
}

fn plain(status: u16, body: &str) -> http::Response<Vec<u8>> {
    let mut response = http::Response::new(body.as_bytes().to_vec());
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    response
}

fn write_response(writer: &mut TcpStream, response: &http::Response<Vec<u8>>) -> io::Result<()> {
    let status = response.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in response.headers() {
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", response.body().len()).as_bytes());
    out.extend_from_slice(response.body());
    writer.write_all(&out)
}
