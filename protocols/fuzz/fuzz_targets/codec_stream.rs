//! Arbitrary bytes as a stream into the blob request-response codec (length
//! prefix, limit check, CBOR head, then a chunk's raw bytes) and into a Raft stream
//! (greeting, then length-prefixed frames one after another), as a peer would send
//! them: must never panic or allocate past the limit.
#![no_main]

use agentmesh_protocols::{blob, raft};
use futures::{executor::block_on, io::Cursor};
use libfuzzer_sys::fuzz_target;
use libp2p::request_response::Codec;

fuzz_target!(|data: &[u8]| {
    let mut codec = blob::codec();
    let _ = block_on(codec.read_request(&blob::PROTOCOL, &mut Cursor::new(data)));
    let _ = block_on(codec.read_response(&blob::PROTOCOL, &mut Cursor::new(data)));
    let mut stream = Cursor::new(data);
    let _ = block_on(async {
        raft::await_greeting(&mut stream).await?;
        while raft::read_frame(&mut stream).await.is_ok() {}
        Ok::<_, std::io::Error>(())
    });
});
