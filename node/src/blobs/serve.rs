//! Answering other peers' manifest and chunk requests.

use super::store::BlobStore;
use crate::network::{InboundBlobRequest, NetworkHandle};
use agentmesh_protocols::blob::{
    BlobRequest, BlobResponse, RequestBody, ResponseBody, BLOB_WIRE_VERSION,
};
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, Semaphore};

/// Chunk reads served at once; further requests wait in the bounded inbound queue.
pub(crate) const MAX_CONCURRENT_READS: usize = 32;

/// Paces served bytes to a configured rate (0 = unpaced).
struct Pacer {
    bytes_per_sec: u64,
    next: Mutex<Instant>,
}

impl Pacer {
    async fn wait(&self, bytes: usize) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let start = {
            let Ok(mut next) = self.next.lock() else {
                return;
            };
            let start = (*next).max(Instant::now());
            *next = start + cost;
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }
}

/// Serves inbound blob requests until the queue closes.
pub async fn serve(
    store: Arc<BlobStore>,
    net: NetworkHandle,
    mut inbound: mpsc::Receiver<InboundBlobRequest>,
    bytes_per_sec: u64,
) {
    let pacer = Arc::new(Pacer {
        bytes_per_sec,
        next: Mutex::new(Instant::now()),
    });
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_READS));
    while let Some(req) = inbound.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (store, net, pacer) = (store.clone(), net.clone(), pacer.clone());
        tokio::spawn(async move {
            let response = answer(store, req.request, &pacer).await;
            net.blob_respond(req.channel, response).await;
            drop(permit);
        });
    }
}

async fn answer(store: Arc<BlobStore>, request: BlobRequest, pacer: &Pacer) -> BlobResponse {
    if request.v != BLOB_WIRE_VERSION {
        return BlobResponse::new(ResponseBody::Error {
            message: format!("unsupported blob protocol version {}", request.v),
        });
    }
    let body = match request.body {
        RequestBody::Manifest { hash } => match store.manifest(&hash) {
            Ok(Some(m)) => ResponseBody::Manifest(m),
            Ok(None) => ResponseBody::NotFound,
            Err(e) => internal(e),
        },
        RequestBody::Chunk { hash, index } => {
            let read = tokio::task::spawn_blocking(move || store.read_chunk(&hash, index)).await;
            match read {
                Ok(Ok(Some(data))) => {
                    pacer.wait(data.len()).await;
                    ResponseBody::Chunk { index, data }
                }
                Ok(Ok(None)) => ResponseBody::NotFound,
                Ok(Err(e)) => internal(e),
                Err(e) => internal(e),
            }
        }
    };
    BlobResponse::new(body)
}

fn internal(e: impl std::fmt::Display) -> ResponseBody {
    tracing::warn!(%e, "cannot serve blob request");
    ResponseBody::Error {
        message: "internal error reading the blob".into(),
    }
}
