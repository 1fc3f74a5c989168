//! Content-addressed blobs: the local store, the fetcher that pulls blobs from
//! the mesh, and the server that answers other peers' chunk requests.

mod fetch;
mod serve;
mod store;

pub use fetch::{FetchError, FetchProgress, FetchReport, Fetcher};
pub use serve::serve;
pub use store::{BlobError, BlobStore, BlobSummary, PartialFetch, PutResult};
