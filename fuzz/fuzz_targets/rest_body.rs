//! Parses arbitrary bytes as the control process's REST request bodies (a registration, a
//! heartbeat, a nexus's in-sync report), with the parsers the server itself calls. Guards: no parser panics, and a body
//! that is accepted re-encodes to JSON that parses back to the same request (what the server
//! stores is what it checked).
#![no_main]

use cairn_control_api::{check_name, parse_heartbeat, parse_insync_report, parse_register};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = parse_register(data) {
        let again = serde_json::to_vec(&r).expect("a request serializes");
        assert_eq!(parse_register(&again).as_ref(), Ok(&r));
    }
    if let Ok(h) = parse_heartbeat(data) {
        let again = serde_json::to_vec(&h).expect("a request serializes");
        assert_eq!(parse_heartbeat(&again).as_ref(), Ok(&h));
    }
    if let Ok(r) = parse_insync_report(data) {
        let again = serde_json::to_vec(&r).expect("a report serializes");
        assert_eq!(parse_insync_report(&again).as_ref(), Ok(&r));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        // A path segment the router hands over: accepted or refused, never a panic.
        drop(check_name("node id", s));
    }
});
