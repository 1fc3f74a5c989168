//! Arbitrary bytes as a stream into the blob request-response codec (length
//! prefix, limit check, CBOR head, then a chunk's raw bytes), as a peer would send
//! them: must never panic or allocate past the limit.
#![no_main]

use agentmesh_protocols::blob;
use futures::{executor::block_on, io::Cursor};
use libfuzzer_sys::fuzz_target;
use libp2p::request_response::Codec;

fuzz_target!(|data: &[u8]| {
    let mut codec = blob::codec();
    let _ = block_on(codec.read_request(&blob::PROTOCOL, &mut Cursor::new(data)));
    let _ = block_on(codec.read_response(&blob::PROTOCOL, &mut Cursor::new(data)));
});
