//! Parses arbitrary bytes as the control process's REST request bodies (a registration, a
//! heartbeat, a nexus's in-sync report, a volume creation, attach, snapshot, clone and grow),
//! with the parsers the server itself calls. Guards: no parser panics, and a body that is accepted re-encodes to
//! JSON that parses back to the same request (what the server stores is what it checked).
#![no_main]

use cairn_control_api::{
    check_name, parse_attach, parse_clone, parse_create_volume, parse_grow, parse_heartbeat,
    parse_insync_report, parse_register, parse_snapshot,
};
use libfuzzer_sys::fuzz_target;

/// A body `$parse` accepts re-encodes to JSON that parses back to the same request.
macro_rules! round_trip {
    ($data:expr, $parse:path) => {
        if let Ok(r) = $parse($data) {
            let again = serde_json::to_vec(&r).expect("a request serializes");
            assert_eq!($parse(&again).as_ref(), Ok(&r));
        }
    };
}

fuzz_target!(|data: &[u8]| {
    round_trip!(data, parse_register);
    round_trip!(data, parse_heartbeat);
    round_trip!(data, parse_create_volume);
    round_trip!(data, parse_attach);
    round_trip!(data, parse_snapshot);
    round_trip!(data, parse_clone);
    round_trip!(data, parse_grow);
    round_trip!(data, parse_insync_report);
    if let Ok(s) = std::str::from_utf8(data) {
        // A path segment the router hands over: accepted or refused, never a panic.
        drop(check_name("node id", s));
    }
});

