#![no_main]
//! Gossip job messages (update announcements, model notices) from arbitrary bytes: errors,
//! never panics.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    agentmesh_protocols::jobs::fuzz_decode(data);
});
