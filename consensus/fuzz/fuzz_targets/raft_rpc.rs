//! Arbitrary bytes into the decoder of inbound Raft-protocol requests (Raft RPCs,
//! forwarded client operations, join requests): must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = agentmesh_consensus::fuzz_decode_request(data);
});
