//! The content-addressed blob protocol.
//!
//! A blob is named by the SHA-256 of its bytes ([`BlobHash`]). It is cut into
//! fixed-size chunks; a [`Manifest`] lists each chunk's SHA-256 so a fetcher can
//! verify every chunk on arrival, from whichever provider it came, and the whole
//! blob at the end. Peers ask for a manifest or one chunk at a time
//! ([`BlobRequest`]); responses are [`BlobResponse`].
//!
//! # Wire format
//!
//! A request is one frame: a 4-byte big-endian length, then that many bytes of
//! CBOR ([`BlobRequest`]). A response is a frame holding its CBOR head (the answer,
//! with a chunk's length in place of its bytes), followed, for a chunk, by exactly
//! that many raw bytes. Chunk bytes are neither CBOR-encoded nor copied into a frame
//! buffer: the provider writes them from the buffer it read from disk, and the
//! fetcher reads them into the buffer it hashes and writes.

use crate::codec::{
    decode_frame, encode_frame, invalid, put_frame, read_frame, too_large, write_frame,
};
use futures::{io::Cursor, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt};
use libp2p::{request_response, StreamProtocol};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use std::{fmt, io, str::FromStr};

/// Protocol id of the blob exchange. Version 2 sends chunk bytes raw after the
/// response head; version 1 (CBOR-encoded chunks) is not spoken.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/agentmesh/blob/2.0.0");

/// Version carried in every request and response head.
pub const BLOB_WIRE_VERSION: u8 = 2;

/// Default chunk size: 1 MiB, large enough to amortise per-request overhead and
/// small enough that a bad chunk costs little to refetch.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;

/// Largest chunk size a manifest may declare (4 MiB).
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;

/// Most chunks one blob may have; with 1 MiB chunks that is a 128 GiB blob and a
/// 4 MiB manifest, which still fits in a response frame.
pub const MAX_CHUNKS: u64 = 128 * 1024;

/// Largest request frame: requests carry a hash and an index, nothing more.
pub const MAX_REQUEST_FRAME: usize = 1024;

/// Largest response head frame: a maximal manifest (4 MiB of chunk hashes) plus
/// CBOR framing overhead. A chunk's bytes follow the head and are limited by
/// [`MAX_CHUNK_SIZE`].
pub const MAX_RESPONSE_FRAME: usize = (MAX_CHUNK_SIZE as usize) + 64 * 1024;

/// SHA-256 of a blob's bytes, its name everywhere in the mesh.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobHash(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl BlobHash {
    /// Hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
    /// The Kademlia key under which providers of this blob are announced.
    pub fn provider_key(&self) -> libp2p::kad::RecordKey {
        libp2p::kad::RecordKey::new(&self.0)
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({self})")
    }
}

/// A string that is not a SHA-256 hex digest.
#[derive(Debug, thiserror::Error)]
#[error("invalid blob hash {input:?}: expected 64 hex digits (a SHA-256)")]
pub struct ParseHashError {
    input: String,
}

impl FromStr for BlobHash {
    type Err = ParseHashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseHashError {
            input: s.chars().take(80).collect(),
        };
        let mut out = [0u8; 32];
        if s.len() != 64 {
            return Err(err());
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
        Ok(Self(out))
    }
}

/// The layout of a blob: its size, chunk size and every chunk's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Size of the blob in bytes.
    pub size: u64,
    /// Size of every chunk but the last.
    pub chunk_size: u32,
    /// Concatenated SHA-256 digests, 32 bytes per chunk.
    pub chunk_hashes: ByteBuf,
}

/// Why a manifest is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Chunk size zero or above [`MAX_CHUNK_SIZE`].
    #[error("chunk size {0} is outside 1..={MAX_CHUNK_SIZE}")]
    ChunkSize(u32),
    /// More chunks than [`MAX_CHUNKS`].
    #[error("blob of {size} bytes needs {chunks} chunks, more than the limit of {MAX_CHUNKS}")]
    TooManyChunks {
        /// Declared size.
        size: u64,
        /// Chunks that size needs.
        chunks: u64,
    },
    /// Hash list length does not match the size.
    #[error("manifest lists {listed} chunk hashes but a {size}-byte blob has {expected} chunks")]
    HashCount {
        /// Declared size.
        size: u64,
        /// Number of hashes present.
        listed: usize,
        /// Number required.
        expected: u64,
    },
}

impl Manifest {
    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size.max(1)))
    }

    /// Checks the manifest is self-consistent and within limits.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(ManifestError::ChunkSize(self.chunk_size));
        }
        let chunks = self.chunk_count();
        if chunks > MAX_CHUNKS {
            return Err(ManifestError::TooManyChunks {
                size: self.size,
                chunks,
            });
        }
        if self.chunk_hashes.len() as u64 != chunks * 32 {
            return Err(ManifestError::HashCount {
                size: self.size,
                listed: self.chunk_hashes.len() / 32,
                expected: chunks,
            });
        }
        Ok(())
    }

    /// SHA-256 of chunk `index`, if it exists.
    pub fn chunk_hash(&self, index: u64) -> Option<[u8; 32]> {
        let start = usize::try_from(index.checked_mul(32)?).ok()?;
        let slice = self.chunk_hashes.get(start..start.checked_add(32)?)?;
        slice.try_into().ok()
    }

    /// Byte offset and length of chunk `index`.
    pub fn chunk_range(&self, index: u64) -> Option<(u64, usize)> {
        chunk_range(self.size, self.chunk_size, index)
    }
}

/// Byte offset and length of chunk `index` of a `size`-byte blob cut into
/// `chunk_size`-byte chunks, if that chunk exists.
pub fn chunk_range(size: u64, chunk_size: u32, index: u64) -> Option<(u64, usize)> {
    let chunk_size = u64::from(chunk_size);
    if chunk_size == 0 || index >= size.div_ceil(chunk_size) {
        return None;
    }
    let start = index * chunk_size;
    let len = (size - start).min(chunk_size);
    Some((start, len as usize))
}

/// Incrementally builds a [`Manifest`] and the whole-blob hash from a byte stream.
pub struct ManifestBuilder {
    chunk_size: u32,
    size: u64,
    whole: Sha256,
    chunk: Sha256,
    in_chunk: u32,
    hashes: Vec<u8>,
}

impl ManifestBuilder {
    /// A builder cutting chunks of `chunk_size` bytes.
    pub fn new(chunk_size: u32) -> Self {
        Self {
            chunk_size: chunk_size.max(1),
            size: 0,
            whole: Sha256::new(),
            chunk: Sha256::new(),
            in_chunk: 0,
            hashes: Vec::new(),
        }
    }

    /// Feeds the next bytes of the blob.
    pub fn update(&mut self, mut data: &[u8]) {
        self.whole.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let room = (self.chunk_size - self.in_chunk) as usize;
            let take = room.min(data.len());
            self.chunk.update(&data[..take]);
            self.in_chunk += take as u32;
            data = &data[take..];
            if self.in_chunk == self.chunk_size {
                let digest = std::mem::take(&mut self.chunk).finalize();
                self.hashes.extend_from_slice(&digest);
                self.in_chunk = 0;
            }
        }
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The blob's hash and manifest.
    pub fn finish(mut self) -> (BlobHash, Manifest) {
        if self.in_chunk > 0 {
            self.hashes.extend_from_slice(&self.chunk.finalize());
        }
        let hash = BlobHash(self.whole.finalize().into());
        let manifest = Manifest {
            size: self.size,
            chunk_size: self.chunk_size,
            chunk_hashes: ByteBuf::from(self.hashes),
        };
        (hash, manifest)
    }
}

/// A request of the blob protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRequest {
    /// Wire version, [`BLOB_WIRE_VERSION`].
    pub v: u8,
    /// What is asked for.
    pub body: RequestBody,
}

/// What a [`BlobRequest`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestBody {
    /// The manifest of a blob.
    Manifest {
        /// Which blob.
        hash: BlobHash,
    },
    /// One chunk of a blob.
    Chunk {
        /// Which blob.
        hash: BlobHash,
        /// Zero-based chunk index.
        index: u64,
    },
}

impl BlobRequest {
    /// A manifest request.
    pub fn manifest(hash: BlobHash) -> Self {
        Self {
            v: BLOB_WIRE_VERSION,
            body: RequestBody::Manifest { hash },
        }
    }
    /// A chunk request.
    pub fn chunk(hash: BlobHash, index: u64) -> Self {
        Self {
            v: BLOB_WIRE_VERSION,
            body: RequestBody::Chunk { hash, index },
        }
    }
}

/// A response of the blob protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobResponse {
    /// Wire version, [`BLOB_WIRE_VERSION`].
    pub v: u8,
    /// The answer.
    pub body: ResponseBody,
}

/// The answer in a [`BlobResponse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseBody {
    /// The requested manifest.
    Manifest(Manifest),
    /// The requested chunk's bytes.
    Chunk {
        /// Zero-based chunk index.
        index: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// This peer does not hold the blob (or the chunk index is out of range).
    NotFound,
    /// The peer is serving too many requests; retry after a pause.
    Busy,
    /// The peer could not serve the request, with a reason.
    Error {
        /// Human-readable reason.
        message: String,
    },
}

impl BlobResponse {
    /// Wraps a body in the current version.
    pub fn new(body: ResponseBody) -> Self {
        Self {
            v: BLOB_WIRE_VERSION,
            body,
        }
    }

    /// The head that goes on the wire, and the chunk bytes that follow it.
    fn into_wire(self) -> io::Result<(ResponseHead, Vec<u8>)> {
        let (body, payload) = match self.body {
            ResponseBody::Manifest(m) => (HeadBody::Manifest(m), Vec::new()),
            ResponseBody::Chunk { index, data } => {
                let len = u32::try_from(data.len())
                    .ok()
                    .filter(|len| *len <= MAX_CHUNK_SIZE)
                    .ok_or_else(|| too_large(data.len(), MAX_CHUNK_SIZE as usize))?;
                (HeadBody::Chunk { index, len }, data)
            }
            ResponseBody::NotFound => (HeadBody::NotFound, Vec::new()),
            ResponseBody::Busy => (HeadBody::Busy, Vec::new()),
            ResponseBody::Error { message } => (HeadBody::Error { message }, Vec::new()),
        };
        Ok((ResponseHead { v: self.v, body }, payload))
    }
}

/// A response as it goes on the wire: a chunk's length stands in for its bytes,
/// which follow the head raw.
#[derive(Serialize, Deserialize)]
struct ResponseHead {
    v: u8,
    body: HeadBody,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum HeadBody {
    Manifest(Manifest),
    Chunk { index: u64, len: u32 },
    NotFound,
    Busy,
    Error { message: String },
}

/// Reads one response: the head frame, then a chunk's bytes straight into the
/// buffer that is handed on.
async fn read_response<R: AsyncRead + Unpin + Send>(io: &mut R) -> io::Result<BlobResponse> {
    let head: ResponseHead = read_frame(io, MAX_RESPONSE_FRAME).await?;
    if head.v != BLOB_WIRE_VERSION {
        return Err(invalid(format!(
            "unsupported blob response version {}",
            head.v
        )));
    }
    let body = match head.body {
        HeadBody::Manifest(m) => ResponseBody::Manifest(m),
        HeadBody::Chunk { index, len } => {
            if len > MAX_CHUNK_SIZE {
                return Err(too_large(len as usize, MAX_CHUNK_SIZE as usize));
            }
            let mut data = vec![0u8; len as usize];
            io.read_exact(&mut data).await?;
            ResponseBody::Chunk { index, data }
        }
        HeadBody::NotFound => ResponseBody::NotFound,
        HeadBody::Busy => ResponseBody::Busy,
        HeadBody::Error { message } => ResponseBody::Error { message },
    };
    Ok(BlobResponse { v: head.v, body })
}

/// Writes one response: the head frame, then a chunk's bytes from the buffer they
/// were read into.
async fn write_response<W: AsyncWrite + Unpin + Send>(
    io: &mut W,
    res: BlobResponse,
) -> io::Result<()> {
    let (head, payload) = res.into_wire()?;
    put_frame(io, &head, MAX_RESPONSE_FRAME).await?;
    if !payload.is_empty() {
        io.write_all(&payload).await?;
    }
    io.close().await
}

/// Decodes a request frame body, without its length prefix (for fuzzing and tests).
pub fn decode_request(bytes: &[u8]) -> io::Result<BlobRequest> {
    decode_frame(bytes, MAX_REQUEST_FRAME)
}

/// Decodes a whole response as it crosses a stream: the length-prefixed head, then
/// a chunk's bytes. Missing or trailing bytes are errors (for fuzzing and tests).
pub fn decode_response(bytes: &[u8]) -> io::Result<BlobResponse> {
    let mut cursor = Cursor::new(bytes);
    let res = read_response(&mut cursor)
        .now_or_never()
        .unwrap_or_else(|| Err(invalid("response reader did not finish".into())))?;
    let trailing = bytes.len() as u64 - cursor.position();
    if trailing > 0 {
        return Err(invalid(format!("{trailing} bytes after the response")));
    }
    Ok(res)
}

/// Encodes a request frame body, without its length prefix.
pub fn encode_request(req: &BlobRequest) -> io::Result<Vec<u8>> {
    encode_frame(req, MAX_REQUEST_FRAME)
}

/// Encodes a whole response as it crosses a stream: the length-prefixed head, then
/// a chunk's bytes.
pub fn encode_response(res: &BlobResponse) -> io::Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    write_response(&mut out, res.clone())
        .now_or_never()
        .unwrap_or_else(|| Err(invalid("response writer did not finish".into())))?;
    Ok(out.into_inner())
}

/// The request-response codec of the blob protocol: CBOR request frames, and
/// responses whose chunk bytes follow a CBOR head raw.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlobCodec;

impl request_response::Codec for BlobCodec {
    type Protocol = StreamProtocol;
    type Request = BlobRequest;
    type Response = BlobResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<BlobRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, MAX_REQUEST_FRAME).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<BlobResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_response(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: BlobRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, MAX_REQUEST_FRAME).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: BlobResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_response(io, res).await
    }
}

/// The blob protocol's codec.
pub fn codec() -> BlobCodec {
    BlobCodec
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn builder_matches_one_shot_hashes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut b = ManifestBuilder::new(4096);
        for piece in data.chunks(777) {
            b.update(piece);
        }
        let (hash, m) = b.finish();
        assert_eq!(hash, BlobHash::of(&data));
        m.validate().unwrap();
        assert_eq!(m.chunk_count(), 3);
        for i in 0..3 {
            let (off, len) = m.chunk_range(i).unwrap();
            let chunk = &data[off as usize..off as usize + len];
            assert_eq!(
                m.chunk_hash(i).unwrap(),
                <[u8; 32]>::from(Sha256::digest(chunk))
            );
        }
        assert_eq!(m.chunk_range(3), None);
        assert_eq!(m.chunk_hash(3), None);
    }

    #[test]
    fn empty_blob_has_no_chunks() {
        let (hash, m) = ManifestBuilder::new(DEFAULT_CHUNK_SIZE).finish();
        assert_eq!(hash, BlobHash::of(b""));
        assert_eq!(m.chunk_count(), 0);
        m.validate().unwrap();
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        let m = Manifest {
            size: 10,
            chunk_size: 0,
            chunk_hashes: ByteBuf::new(),
        };
        assert_eq!(m.validate(), Err(ManifestError::ChunkSize(0)));
        let m = Manifest {
            size: 10,
            chunk_size: 4,
            chunk_hashes: ByteBuf::from(vec![0; 64]),
        };
        assert!(matches!(
            m.validate(),
            Err(ManifestError::HashCount { expected: 3, .. })
        ));
        let m = Manifest {
            size: u64::MAX,
            chunk_size: 1,
            chunk_hashes: ByteBuf::new(),
        };
        assert!(matches!(
            m.validate(),
            Err(ManifestError::TooManyChunks { .. })
        ));
    }

    #[test]
    fn hash_parsing_is_strict() {
        let h = BlobHash::of(b"x");
        assert_eq!(h.to_string().parse::<BlobHash>().unwrap(), h);
        assert!("abc".parse::<BlobHash>().is_err());
        assert!("zz".repeat(32).parse::<BlobHash>().is_err());
    }

    #[test]
    fn maximal_chunk_response_fits_the_frame_limit() {
        let res = BlobResponse::new(ResponseBody::Chunk {
            index: u64::MAX,
            data: vec![0xab; MAX_CHUNK_SIZE as usize],
        });
        let bytes = encode_response(&res).unwrap();
        assert_eq!(decode_response(&bytes).unwrap(), res);
        // The chunk's bytes follow the head raw: the response is the chunk plus a
        // few dozen bytes, not a CBOR re-encoding of it.
        assert!(
            bytes.len() < MAX_CHUNK_SIZE as usize + 64,
            "{}",
            bytes.len()
        );
        assert!(bytes.ends_with(&[0xab; 4096]));
    }

    #[test]
    fn chunk_over_the_limit_is_refused_both_ways() {
        let res = BlobResponse::new(ResponseBody::Chunk {
            index: 0,
            data: vec![0; MAX_CHUNK_SIZE as usize + 1],
        });
        let err = encode_response(&res).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        // A head announcing a chunk over the limit is refused before its bytes are read.
        let head = encode_frame(
            &ResponseHead {
                v: BLOB_WIRE_VERSION,
                body: HeadBody::Chunk {
                    index: 0,
                    len: MAX_CHUNK_SIZE + 1,
                },
            },
            MAX_RESPONSE_FRAME,
        )
        .unwrap();
        let mut bytes = (head.len() as u32).to_be_bytes().to_vec();
        bytes.extend(head);
        let err = decode_response(&bytes).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }

    #[test]
    fn short_and_trailing_chunk_bytes_are_errors() {
        let res = BlobResponse::new(ResponseBody::Chunk {
            index: 3,
            data: vec![1, 2, 3, 4],
        });
        let bytes = encode_response(&res).unwrap();
        assert_eq!(decode_response(&bytes).unwrap(), res);
        let err = decode_response(&bytes[..bytes.len() - 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_response(&longer).is_err());
    }

    #[test]
    fn other_response_versions_are_refused_before_their_bytes() {
        let res = BlobResponse {
            v: 1,
            body: ResponseBody::Chunk {
                index: 0,
                data: vec![9; 16],
            },
        };
        let err = decode_response(&encode_response(&res).unwrap()).unwrap_err();
        assert!(err.to_string().contains("version 1"), "{err}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }

        #[test]
        fn response_round_trip(index: u64, data in proptest::collection::vec(any::<u8>(), 0..4096), kind in 0u8..5, message in ".{0,40}") {
            let body = match kind {
                0 => ResponseBody::Chunk { index, data },
                1 => ResponseBody::Manifest(Manifest { size: data.len() as u64, chunk_size: 4096, chunk_hashes: ByteBuf::from(vec![7; 32]) }),
                2 => ResponseBody::NotFound,
                3 => ResponseBody::Busy,
                _ => ResponseBody::Error { message },
            };
            let res = BlobResponse::new(body);
            let bytes = encode_response(&res).unwrap();
            prop_assert_eq!(decode_response(&bytes).unwrap(), res);
        }

        #[test]
        fn request_round_trip(hash: [u8; 32], index: u64, manifest: bool) {
            let req = if manifest { BlobRequest::manifest(BlobHash(hash)) } else { BlobRequest::chunk(BlobHash(hash), index) };
            let bytes = encode_frame(&req, MAX_REQUEST_FRAME).unwrap();
            prop_assert_eq!(decode_request(&bytes).unwrap(), req);
        }
    }
}
