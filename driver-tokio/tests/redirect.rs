//! A redirect is not followed: Consul's API never answers with one, and following it would send
//! `X-Consul-Token` to wherever it points. The reply is a fatal, explained error instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use consul_lock_core::api::{ApiError, ClientConfig, Key, KvGet, Token};
use consul_lock_tokio::{CallError, Client, Error};

const TOKEN: &str = "5e3f0c1a-secret-token-redirect";

/// A listener that counts the connections it gets, answering none of them.
fn counting_listener() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (addr, count)
}

/// Answers every request on `stream` (bodiless requests; a body is read as part of the next
/// head, which is harmless here) with a 307 to `location`.
fn redirect_each(mut stream: TcpStream, location: &str) {
    let mut buf = [0u8; 65536];
    let mut head = Vec::new();
    loop {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        head.clear();
        let reply =
            format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n");
        if stream.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// A listener that answers every request with a 307 to `location`.
fn redirecting_listener(location: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let location = location.clone();
            std::thread::spawn(move || redirect_each(stream, &location));
        }
    });
    addr
}

fn client(addr: &str) -> Client {
    let mut config = ClientConfig::http(addr).unwrap();
    config.token = Some(Token::new(TOKEN).unwrap());
    Client::new(config).unwrap()
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_is_explained() {
    let (target, reached) = counting_listener();
    let location = format!("http://{target}/v1/kv/stolen");
    let client = client(&redirecting_listener(location.clone()));

    let read = client
        .call(&KvGet::new(Key::new("a").unwrap()), Duration::from_secs(10))
        .await;
    let Err(CallError::Api(e @ ApiError::Redirect { status: 307, .. })) = read else {
        panic!("expected a redirect error, got {read:?}")
    };
    let text = e.to_string();
    assert!(
        text.contains("does not redirect") && text.contains(&location),
        "{text}"
    );
    assert!(!text.contains(TOKEN), "{text}");
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "the redirect target was contacted"
    );
}

#[tokio::test]
async fn a_lock_fails_at_once_on_a_redirect_instead_of_retrying() {
    let (target, reached) = counting_listener();
    let client = client(&redirecting_listener(format!("http://{target}/")));
    let lock = client.lock_key("a").unwrap();
    // Bounded only so that a regression fails instead of hanging; a fatal error ends at once.
    let acquired = tokio::time::timeout(Duration::from_secs(60), lock.acquire())
        .await
        .expect("a redirect must end the attempt, not be retried");
    let Err(e) = acquired else {
        panic!("acquired through a redirect")
    };
    assert!(
        matches!(&e, Error::Lock(_)) && e.to_string().contains("does not redirect"),
        "{e:?}"
    );
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "the redirect target was contacted"
    );
}
