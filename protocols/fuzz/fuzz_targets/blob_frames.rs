//! Arbitrary bytes into the blob request and response decoders, and any manifest
//! they produce through validation and chunk lookups: must never panic.
#![no_main]

use agentmesh_protocols::blob::{decode_request, decode_response, ResponseBody};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_request(data);
    if let Ok(res) = decode_response(data) {
        if let ResponseBody::Manifest(m) = res.body {
            if m.validate().is_ok() {
                for i in [0, 1, m.chunk_count().saturating_sub(1), m.chunk_count(), u64::MAX] {
                    let _ = m.chunk_hash(i);
                    let _ = m.chunk_range(i);
                }
            }
        }
    }
});
