//! The Raft protocol (`/agentmesh/raft/2.0.0`): opaque frames between cluster members on
//! long-lived streams.
//!
//! The consensus crate encodes its messages (Raft RPCs, requests forwarded to the leader, join
//! requests) and decodes them with its own limit; this protocol only moves the bytes, so it
//! carries no openraft types.
//!
//! # Wire
//! A stream carries one call at a time and is reused for the next:
//! - the side that accepts the stream first writes one byte, [`GREETING`];
//! - the opener waits for it, then writes a request frame; the acceptor answers with one
//!   response frame; the opener may then write the next request on the same stream.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes; the length is checked
//! against [`MAX_FRAME`] before anything is allocated. The greeting tells the opener that a
//! stream was taken up: a stream the acceptor drops unread (it is busy, or over its per-peer
//! limit) fails before any request crossed, so the opener can safely retry on a fresh one.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use std::io;

use crate::codec::too_large;

/// Protocol id.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/agentmesh/raft/2.0.0");

/// Largest frame either way: the consensus crate's 16 MiB message limit plus framing.
pub const MAX_FRAME: usize = 16 * 1024 * 1024 + 1024;

/// The byte an acceptor writes when it takes up a stream.
pub const GREETING: u8 = 0xA7;

/// Opener side: waits for the acceptor's greeting on a new stream.
pub async fn await_greeting<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<()> {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    if byte[0] != GREETING {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected the raft greeting, got byte {:#04x}", byte[0]),
        ));
    }
    Ok(())
}

/// Acceptor side: takes up a new stream.
pub async fn greet<S: AsyncWrite + Unpin>(stream: &mut S) -> io::Result<()> {
    stream.write_all(&[GREETING]).await?;
    stream.flush().await
}

/// Writes one frame and flushes it.
pub async fn write_frame<S: AsyncWrite + Unpin>(stream: &mut S, body: &[u8]) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(too_large(body.len(), MAX_FRAME));
    }
    // One buffer, so a small message leaves in one muxer frame.
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(body);
    stream.write_all(&buf).await?;
    stream.flush().await
}

/// Reads one frame of at most [`MAX_FRAME`] bytes.
pub async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(too_large(len, MAX_FRAME));
    }
    // Grown as bytes arrive, not sized by the claim: a peer announcing a large frame and
    // sending it slowly (or never) holds only what it sent.
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    stream.take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame ended after {} of {len} bytes", body.len()),
        ));
    }
    Ok(body)
}

/// Opener side: one call on a stream that has been greeted.
pub async fn call<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
) -> io::Result<Vec<u8>> {
    write_frame(stream, request).await?;
    read_frame(stream).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[tokio::test]
    async fn frames_round_trip_and_follow_each_other() {
        let mut buf = Cursor::new(Vec::new());
        write_frame(&mut buf, b"first").await.unwrap();
        write_frame(&mut buf, b"").await.unwrap();
        write_frame(&mut buf, &[7u8; 70_000]).await.unwrap();
        buf.set_position(0);
        assert_eq!(read_frame(&mut buf).await.unwrap(), b"first");
        assert_eq!(read_frame(&mut buf).await.unwrap(), b"");
        assert_eq!(read_frame(&mut buf).await.unwrap(), vec![7u8; 70_000]);
        let eof = read_frame(&mut buf).await.unwrap_err();
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn an_announced_length_over_the_limit_is_refused_before_reading() {
        let mut frame = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 8]);
        let err = read_frame(&mut Cursor::new(frame)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        let err = read_frame(&mut Cursor::new(u32::MAX.to_be_bytes().to_vec()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_short_frame_is_an_error() {
        let mut frame = 10u32.to_be_bytes().to_vec();
        frame.extend_from_slice(b"abc");
        let err = read_frame(&mut Cursor::new(frame)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn the_greeting_is_checked() {
        let mut buf = Cursor::new(Vec::new());
        greet(&mut buf).await.unwrap();
        buf.set_position(0);
        await_greeting(&mut buf).await.unwrap();
        let err = await_greeting(&mut Cursor::new(vec![0u8]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = await_greeting(&mut Cursor::new(Vec::new()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn oversized_writes_are_refused() {
        let err = write_frame(&mut Cursor::new(Vec::new()), &vec![0u8; MAX_FRAME + 1])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }
}
