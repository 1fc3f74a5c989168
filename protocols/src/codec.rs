//! A length-prefixed CBOR codec for libp2p request-response protocols.
//!
//! Each frame is a 4-byte big-endian length followed by that many bytes of CBOR.
//! The length is checked against the limit before anything is allocated, so a peer
//! cannot make us buffer more than the limit by announcing a huge frame.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{request_response, StreamProtocol};
use serde::{de::DeserializeOwned, Serialize};
use std::{io, marker::PhantomData};

/// Size limits of one codec, in bytes of encoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecLimits {
    max_request: usize,
    max_response: usize,
}

impl CodecLimits {
    /// Limits for requests and responses.
    pub fn new(max_request: usize, max_response: usize) -> Self {
        Self {
            max_request,
            max_response,
        }
    }
    /// Largest request frame accepted.
    pub fn max_request(&self) -> usize {
        self.max_request
    }
    /// Largest response frame accepted.
    pub fn max_response(&self) -> usize {
        self.max_response
    }
}

/// Request-response codec encoding `Req`/`Resp` as length-prefixed CBOR.
pub struct CborCodec<Req, Resp> {
    limits: CodecLimits,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> CborCodec<Req, Resp> {
    /// A codec enforcing `limits`.
    pub fn new(limits: CodecLimits) -> Self {
        Self {
            limits,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for CborCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.limits)
    }
}

/// Decodes a complete frame body (without the length prefix), checking `limit` first.
pub(crate) fn decode_frame<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> io::Result<T> {
    if bytes.len() > limit {
        return Err(too_large(bytes.len(), limit));
    }
    ciborium::from_reader(bytes).map_err(|e| invalid(format!("malformed CBOR frame: {e}")))
}

/// Encodes a frame body (without the length prefix), refusing results over `limit`.
pub(crate) fn encode_frame<T: Serialize>(value: &T, limit: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|e| invalid(format!("encode failed: {e}")))?;
    if out.len() > limit {
        return Err(too_large(out.len(), limit));
    }
    Ok(out)
}

pub(crate) fn too_large(size: usize, limit: usize) -> io::Error {
    invalid(format!(
        "frame of {size} bytes exceeds the limit of {limit} bytes"
    ))
}

pub(crate) fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

pub(crate) async fn read_frame<T, R>(io: &mut R, limit: usize) -> io::Result<T>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin + Send,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(too_large(len, limit));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    decode_frame(&buf, limit)
}

/// Writes one length-prefixed frame and leaves the stream open (more may follow).
pub(crate) async fn put_frame<T, W>(io: &mut W, value: &T, limit: usize) -> io::Result<()>
where
    T: Serialize,
    W: AsyncWrite + Unpin + Send,
{
    let body = encode_frame(value, limit)?;
    let len = u32::try_from(body.len()).map_err(|_| too_large(body.len(), limit))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&body).await
}

/// Writes one length-prefixed frame and closes the stream.
pub(crate) async fn write_frame<T, W>(io: &mut W, value: &T, limit: usize) -> io::Result<()>
where
    T: Serialize,
    W: AsyncWrite + Unpin + Send,
{
    put_frame(io, value, limit).await?;
    io.close().await
}

impl<Req, Resp> request_response::Codec for CborCodec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + Sync + 'static,
    Resp: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.limits.max_request).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.limits.max_response).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.limits.max_request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.limits.max_response).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use libp2p::request_response::Codec as _;

    type C = CborCodec<String, String>;
    const P: StreamProtocol = StreamProtocol::new("/test/1");

    #[tokio::test]
    async fn frames_round_trip() {
        let mut c = C::new(CodecLimits::new(64, 64));
        let mut buf = Cursor::new(Vec::new());
        c.write_request(&P, &mut buf, "hi".into()).await.unwrap();
        buf.set_position(0);
        assert_eq!(c.read_request(&P, &mut buf).await.unwrap(), "hi");
    }

    #[tokio::test]
    async fn announced_length_over_limit_is_refused_without_reading() {
        let mut c = C::new(CodecLimits::new(64, 64));
        let mut frame = (u32::MAX).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 8]);
        let err = c
            .read_request(&P, &mut Cursor::new(frame))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("exceeds the limit of 64"), "{err}");
    }

    #[tokio::test]
    async fn garbage_is_invalid_data() {
        let mut c = C::new(CodecLimits::new(64, 64));
        let mut frame = 4u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        let err = c
            .read_request(&P, &mut Cursor::new(frame))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn oversized_writes_are_refused() {
        let mut c = C::new(CodecLimits::new(8, 8));
        let err = c
            .write_response(&P, &mut Cursor::new(Vec::new()), "x".repeat(100))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }
}
