//! Every Endpoint's `decode` on arbitrary replies: never a panic, and the checks of
//! `consul_lock_fuzz::oracle` (exact error statuses, `true`/`false`, metadata headers, agreement
//! between decoders, structured replies decoding to what they were built from).
//!
//! Input: a reply in the seed format (`HTTP/1.1 200 OK`, headers, blank line, body: see
//! fuzz/README.md) when it starts with `HTTP/`; otherwise the bytes drive `arbitrary` to build a
//! structured reply (a status in 100..=599, the metadata headers with valid or hostile values,
//! other headers, and a body: raw bytes, or Consul's JSON shapes with arbitrary fields).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use consul_lock_fuzz::{arb_reply, http_text, oracle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if http_text::is_http_text(data) {
        let response = http_text::parse(data);
        oracle::check_reply(&response, None);
    } else {
        let mut u = Unstructured::new(data);
        let Ok(reply) = arb_reply::Reply::arbitrary(&mut u) else {
            return;
        };
        let (response, expect) = reply.build();
        oracle::check_reply(&response, Some(&expect));
    }
});
