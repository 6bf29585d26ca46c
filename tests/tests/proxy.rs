//! The fault proxy in front of a real agent: pass-through, black hole, refuse, injected 500s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use consul_lock_core::api::{Key, KvCasPut, KvGet, SessionCreate, SessionDestroy};
use consul_lock_testkit::TestTransport;
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::proxy::{FaultProxy, Mode, Outcome};
use consul_lock_testkit::transport::blocking_client_builder;

fn client(timeout: Duration) -> reqwest::blocking::Client {
    blocking_client_builder().timeout(timeout).build().unwrap()
}

/// Sends one request on a raw connection and reads one response (Content-Length bodies only):
/// `None` if nothing complete came back within `timeout`.
fn raw_exchange(stream: &mut TcpStream, request: &str, timeout: Duration) -> Option<(u16, String)> {
    stream.write_all(request.as_bytes()).ok()?;
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut status_line = String::new();
    if reader.read_line(&mut status_line).ok()? == 0 {
        return None;
    }
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn leader_request() -> &'static str {
    "GET /v1/status/leader HTTP/1.1\r\nHost: consul\r\n\r\n"
}

#[test]
fn pass_forwards_requests_and_bodies_on_kept_alive_connections() {
    let Some(agent) = require_agent() else { return };
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let config = proxy.config();
    let http = TestTransport::new().unwrap();
    // A PUT with a body, a GET, through one client (one pooled connection).
    let session = http
        .call(
            &config,
            &SessionCreate {
                name: Some("proxy pass".into()),
                ttl: Some(Duration::from_secs(30)),
                ..SessionCreate::default()
            },
        )
        .unwrap()
        .unwrap();
    let key = Key::new("proxy/pass").unwrap();
    let put = KvCasPut {
        key: key.clone(),
        cas: 0,
        flags: 7,
        value: vec![b'x'; 100_000],
    };
    assert!(http.call(&config, &put).unwrap().unwrap());
    let pair = http
        .call(&config, &KvGet::new(key))
        .unwrap()
        .unwrap()
        .value
        .unwrap();
    assert_eq!((pair.flags, pair.value.len()), (7, 100_000));
    assert!(
        http.call(&config, &SessionDestroy { id: session })
            .unwrap()
            .unwrap()
    );
    let counters = proxy.counters();
    assert_eq!((counters.requests, counters.forwarded), (4, 4), "{counters:?}");
    assert_eq!(
        counters.connections, 1,
        "keep-alive: one connection for all: {counters:?}"
    );

    // A chunked request body goes through too.
    let mut stream = TcpStream::connect(proxy.addr()).unwrap();
    let chunked = "PUT /v1/kv/proxy/chunked HTTP/1.1\r\nHost: consul\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    assert_eq!(
        raw_exchange(&mut stream, chunked, Duration::from_secs(5)),
        Some((200, "true\n".into()))
    );
    let get = "GET /v1/kv/proxy/chunked?raw HTTP/1.1\r\nHost: consul\r\n\r\n";
    assert_eq!(
        raw_exchange(&mut stream, get, Duration::from_secs(5)),
        Some((200, "hello world".into()))
    );
    let seen = proxy.requests();
    let last = seen.last().unwrap();
    assert_eq!(
        (last.head.method.as_str(), last.head.path()),
        ("GET", "/v1/kv/proxy/chunked")
    );
    assert!(last.head.has_param("raw"));
}

#[test]
fn black_hole_hangs_requests_and_kills_the_connections_it_touched() {
    let Some(agent) = require_agent() else { return };
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let base = format!("http://{}", proxy.addr());

    // A connection opened before the black hole, working.
    let mut old = TcpStream::connect(proxy.addr()).unwrap();
    assert_eq!(
        raw_exchange(&mut old, leader_request(), Duration::from_secs(5)).map(|r| r.0),
        Some(200)
    );

    proxy.set_mode(Mode::BlackHole);
    // A new connection is accepted, but the request hangs until the client's timeout.
    let started = Instant::now();
    let err = client(Duration::from_millis(800))
        .get(format!("{base}/v1/status/leader"))
        .send()
        .unwrap_err();
    let waited = started.elapsed();
    assert!(err.is_timeout(), "{err:?}");
    assert!(waited >= Duration::from_millis(750), "{waited:?}");
    // Nothing reached the agent: the request was dropped.
    assert_eq!(proxy.count(|s| s.outcome == Outcome::Dropped), 1);
    // The old connection: nothing comes back either.
    assert_eq!(
        raw_exchange(&mut old, leader_request(), Duration::from_millis(500)),
        None
    );

    proxy.set_mode(Mode::Pass);
    // New connections work again; the old one stays dead.
    let reply = client(Duration::from_secs(5))
        .get(format!("{base}/v1/status/leader"))
        .send()
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(
        raw_exchange(&mut old, leader_request(), Duration::from_millis(500)),
        None
    );
    let counters = proxy.counters();
    assert_eq!(counters.dropped, 3, "{counters:?}");
}

#[test]
fn black_hole_swallows_the_answer_to_a_request_in_flight() {
    let Some(agent) = require_agent() else { return };
    let http = TestTransport::new().unwrap();
    let config = agent.config().unwrap();
    let key = Key::new("proxy/in-flight").unwrap();
    assert!(
        http.call(
            &config,
            &KvCasPut {
                key: key.clone(),
                cas: 0,
                flags: 0,
                value: b"1".to_vec()
            }
        )
        .unwrap()
        .unwrap()
    );
    let index = http
        .call(&config, &KvGet::new(key.clone()))
        .unwrap()
        .unwrap()
        .meta
        .index;
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let mut stream = TcpStream::connect(proxy.addr()).unwrap();
    // A blocking read, forwarded, then a black hole, then the key changes: the answer is lost.
    let blocking =
        format!("GET /v1/kv/proxy/in-flight?index={index}&wait=3s HTTP/1.1\r\nHost: consul\r\n\r\n");
    stream.write_all(blocking.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(proxy.counters().forwarded, 1);
    proxy.set_mode(Mode::BlackHole);
    let pair = http
        .call(&config, &KvGet::new(key.clone()))
        .unwrap()
        .unwrap()
        .value
        .unwrap();
    let put = KvCasPut {
        key,
        cas: pair.modify_index,
        flags: 0,
        value: b"2".to_vec(),
    };
    assert!(http.call(&config, &put).unwrap().unwrap());
    stream.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut buf = [0u8; 64];
    let read = stream.read(&mut buf);
    assert!(read.is_err(), "nothing may come back: {read:?}");
}

#[test]
fn refuse_closes_new_connections_and_cuts_existing_ones() {
    let Some(agent) = require_agent() else { return };
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let base = format!("http://{}", proxy.addr());
    let mut old = TcpStream::connect(proxy.addr()).unwrap();
    assert_eq!(
        raw_exchange(&mut old, leader_request(), Duration::from_secs(5)).map(|r| r.0),
        Some(200)
    );

    proxy.set_mode(Mode::Refuse);
    let started = Instant::now();
    let err = client(Duration::from_secs(5))
        .get(format!("{base}/v1/status/leader"))
        .send()
        .unwrap_err();
    assert!(!err.is_timeout(), "refused, not timed out: {err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The old connection was cut: end of file.
    old.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(old.read(&mut buf), Ok(0) | Err(_)));
    assert!(proxy.counters().refused >= 1);

    proxy.set_mode(Mode::Pass);
    let reply = client(Duration::from_secs(5))
        .get(format!("{base}/v1/status/leader"))
        .send()
        .unwrap();
    assert_eq!(reply.status(), 200);
}

#[test]
fn injected_500s_arrive_for_the_matching_requests_only() {
    let Some(agent) = require_agent() else { return };
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let base = format!("http://{}", proxy.addr());
    let http = client(Duration::from_secs(5));

    proxy.fail_next_gets(2);
    assert_eq!(proxy.armed_faults(), 2);
    // A PUT is not a GET: it goes through.
    let put = http
        .put(format!("{base}/v1/kv/proxy/inject"))
        .body("v")
        .send()
        .unwrap();
    assert_eq!(put.status(), 200);
    for _ in 0..2 {
        let reply = http.get(format!("{base}/v1/kv/proxy/inject")).send().unwrap();
        assert_eq!(reply.status(), 500);
        assert!(reply.text().unwrap().contains("fault injected"));
    }
    let reply = http.get(format!("{base}/v1/kv/proxy/inject")).send().unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(proxy.armed_faults(), 0);

    // A predicate: only consistent reads of one key.
    proxy.fail_requests(
        |head| head.path() == "/v1/kv/proxy/inject" && head.has_param("consistent"),
        1,
    );
    let reply = http.get(format!("{base}/v1/kv/proxy/inject")).send().unwrap();
    assert_eq!(reply.status(), 200);
    let reply = http
        .get(format!("{base}/v1/kv/proxy/inject?consistent"))
        .send()
        .unwrap();
    assert_eq!(reply.status(), 500);
    let reply = http
        .get(format!("{base}/v1/kv/proxy/inject?consistent"))
        .send()
        .unwrap();
    assert_eq!(reply.status(), 200);

    proxy.fail_next_gets(5);
    proxy.clear_faults();
    let reply = http.get(format!("{base}/v1/kv/proxy/inject")).send().unwrap();
    assert_eq!(reply.status(), 200);

    let counters = proxy.counters();
    assert_eq!((counters.injected, counters.requests), (3, 8), "{counters:?}");
    assert_eq!(
        counters.connections, 1,
        "500s keep the connection alive: {counters:?}"
    );
}

#[test]
fn dropping_the_proxy_closes_everything() {
    let Some(agent) = require_agent() else { return };
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let addr = proxy.addr();
    let mut open = TcpStream::connect(addr).unwrap();
    assert_eq!(
        raw_exchange(&mut open, leader_request(), Duration::from_secs(5)).map(|r| r.0),
        Some(200)
    );
    let mut holed = TcpStream::connect(addr).unwrap();
    proxy.set_mode(Mode::BlackHole);
    holed.write_all(leader_request().as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    drop(proxy);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    for stream in [&mut open, &mut holed] {
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(stream.read(&mut buf), Ok(0) | Err(_)));
    }
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "listener closed"
    );
}
