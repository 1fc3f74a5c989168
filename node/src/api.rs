//! The HTTP API (see `interface.md`): health, metrics, status, peers, gossip,
//! events over WebSocket, and blobs.

mod access;
pub mod auth;
mod cluster;
mod jobs;

use crate::{
    blobs::{BlobError, BlobStore, FetchError, Fetcher},
    metrics::Metrics,
    network::{NetworkError, NetworkHandle, NodeEvent, Readiness},
};
use agentmesh_consensus::Cluster;
use agentmesh_protocols::{blob::BlobHash, MAX_ENVELOPE_SIZE};
use axum::{
    body::Body,
    extract::{
        ws::{Message, WebSocket, WebSocketUpgrade},
        DefaultBodyLimit, Extension, Path, Query, State,
    },
    http::{header, StatusCode},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::{collections::HashSet, sync::Arc};
use tokio::sync::{broadcast, watch};

/// Largest body accepted by `POST /v1/topics/{topic}/messages`: what fits in one
/// envelope after its own fields (sender, id, timestamp).
pub const MAX_PUBLISH_BODY: usize = MAX_ENVELOPE_SIZE - 1024;

/// Bytes of an over-limit body read and thrown away before answering 413, so
/// the client, still sending, gets to read the answer instead of a reset.
/// Larger bodies are cut off with the connection.
pub const MAX_DRAIN: usize = 8 << 20;

/// Shared state of the API handlers.
pub struct ApiState {
    /// Swarm handle.
    pub net: NetworkHandle,
    /// Local blobs.
    pub store: Arc<BlobStore>,
    /// Mesh fetches.
    pub fetcher: Arc<Fetcher>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Event fan-out.
    pub events: broadcast::Sender<NodeEvent>,
    /// Listening / connectivity state.
    pub readiness: watch::Receiver<Readiness>,
    /// This node's Raft member.
    pub cluster: Cluster,
    /// Training jobs.
    pub jobs: crate::jobs::Jobs,
    /// This node's sealing keys.
    pub sealer: Arc<crate::sealing::Sealer>,
    /// Who may do what, and how often.
    pub access: auth::Access,
    /// Node name.
    pub name: String,
    /// Whether this node was told to join others (then ready needs a peer).
    pub expects_peers: bool,
}

/// An API error: a status and a message, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<NetworkError> for ApiError {
    fn from(e: NetworkError) -> Self {
        let status = match &e {
            NetworkError::InvalidTopic(_) => StatusCode::BAD_REQUEST,
            NetworkError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            NetworkError::Duplicate => StatusCode::CONFLICT,
            NetworkError::NoSubscribers(_) | NetworkError::Stopped => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            NetworkError::Request { .. } | NetworkError::Unreachable { .. } => {
                StatusCode::BAD_GATEWAY
            }
            NetworkError::Publish(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

impl From<BlobError> for ApiError {
    fn from(e: BlobError) -> Self {
        let status = match &e {
            BlobError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BlobError::Upload(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

impl From<FetchError> for ApiError {
    fn from(e: FetchError) -> Self {
        let status = match &e {
            FetchError::NoProviders(_) => StatusCode::NOT_FOUND,
            FetchError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            FetchError::NoManifest { .. }
            | FetchError::ProvidersFailed { .. }
            | FetchError::ContentMismatch(_) => StatusCode::BAD_GATEWAY,
            FetchError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            FetchError::Network(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self(status, e.to_string())
    }
}

type Shared = Arc<ApiState>;

/// Builds the router.
pub fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route(
            "/v1/topics/{topic}/messages",
            post(publish).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/topics/{topic}", get(topic))
        .route("/v1/events", get(events))
        .route(
            "/v1/blobs",
            get(list_blobs)
                .post(put_blob)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/blobs/{hash}", get(get_blob))
        .route("/v1/blobs/{hash}/fetch", post(fetch_blob))
        .route("/v1/blobs/{hash}/status", get(blob_status))
        .route("/v1/blobs/{hash}/providers", get(blob_providers))
        .merge(cluster::routes())
        .merge(jobs::routes())
        .merge(access::routes())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ));
    auth::spawn_limiter_cleanup(state.clone());
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .with_state(state)
}

/// Compares without an early exit, so timing does not reveal a key prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(s): State<Shared>) -> Response {
    let r = s.readiness.borrow().clone();
    let reason = if !r.listening {
        Some("not listening yet")
    } else if s.expects_peers && r.connected_peers == 0 {
        Some("no bootstrap peer reached yet")
    } else if !s.cluster.has_leader() {
        Some("not in a cluster with a known leader")
    } else {
        None
    };
    match reason {
        None => (StatusCode::OK, Json(json!({ "ready": true }))).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": reason })),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn status(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    let st = s.net.status().await?;
    let raft = s.cluster.status();
    // A rename is replicated; the registry's name is the node's name.
    let name = raft
        .members
        .iter()
        .find(|m| m.peer_id == st.peer_id)
        .map_or_else(|| s.name.clone(), |m| m.name.clone());
    Ok(Json(json!({
        "peer_id": st.peer_id,
        "name": name,
        "version": env!("CARGO_PKG_VERSION"),
        "listen_addrs": st.listen_addrs,
        "connected_peers": st.connected_peers,
        "raft": raft,
    })))
}

async fn peers(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    let mut peers = s.net.peers().await?;
    let members = s.cluster.status().members;
    for p in &mut peers {
        if let Some(m) = members.iter().find(|m| m.peer_id == p.peer_id) {
            p.name.clone_from(&m.name);
        }
    }
    Ok(Json(serde_json::to_value(peers).unwrap_or_default()))
}

/// Reads a body of at most `limit` bytes; a larger one is drained (up to
/// [`MAX_DRAIN`]) and refused with 413.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        seen += piece.len();
        if seen <= limit {
            buf.extend_from_slice(&piece);
        } else if seen > limit + MAX_DRAIN {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body exceeds the limit of {limit} bytes"),
        ));
    }
    Ok(buf.freeze())
}

async fn publish(
    State(s): State<Shared>,
    Path(topic): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = read_limited(body, MAX_PUBLISH_BODY).await?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "empty message: send the message as the request body",
        ));
    }
    let id = s.net.publish(topic.clone(), body.to_vec()).await?;
    Ok(Json(json!({ "topic": topic, "message_id": id })))
}

async fn topic(
    State(s): State<Shared>,
    Path(topic): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        serde_json::to_value(s.net.topic(topic).await?).unwrap_or_default(),
    ))
}

#[derive(Deserialize)]
struct EventsQuery {
    /// Comma-separated topics to subscribe to for the life of the socket.
    #[serde(default)]
    topics: String,
}

async fn events(
    State(s): State<Shared>,
    Query(q): Query<EventsQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let topics: Vec<String> = q
        .topics
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect();
    // Subscribe before upgrading so a bad topic is a 400, not a closed socket.
    // The guard releases the subscriptions however this ends: an error here, a
    // failed upgrade (the callback never runs), or the socket closing.
    let mut guard = Subscriptions {
        net: s.net.clone(),
        topics: Vec::new(),
    };
    for t in &topics {
        s.net.subscribe(t.clone()).await?;
        guard.topics.push(t.clone());
    }
    let rx = s.events.subscribe();
    Ok(ws.on_upgrade(move |socket| async move {
        stream_events(socket, rx, &guard.topics).await;
        drop(guard);
    }))
}

/// Topic subscriptions held for one event stream, released on drop.
struct Subscriptions {
    net: NetworkHandle,
    topics: Vec<String>,
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        let (net, topics) = (self.net.clone(), std::mem::take(&mut self.topics));
        if topics.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for t in topics {
                net.unsubscribe(t).await;
            }
        });
    }
}

/// The JSON form of an event; gossip data as UTF-8 text, or base64 when not text.
pub fn event_json(ev: &NodeEvent) -> Value {
    match ev {
        NodeEvent::Gossip {
            topic,
            from,
            message_id,
            data,
        } => {
            let mut v =
                json!({ "type": "gossip", "topic": topic, "from": from, "message_id": message_id });
            match std::str::from_utf8(data) {
                Ok(text) => v["data"] = json!(text),
                Err(_) => {
                    v["data_b64"] = json!(base64::engine::general_purpose::STANDARD.encode(data))
                }
            }
            v
        }
        other => serde_json::to_value(other).unwrap_or_default(),
    }
}

async fn stream_events(
    mut socket: WebSocket,
    mut rx: broadcast::Receiver<NodeEvent>,
    topics: &[String],
) {
    let wanted: HashSet<&str> = topics.iter().map(String::as_str).collect();
    let hello = json!({ "type": "subscribed", "topics": topics }).to_string();
    if socket.send(Message::Text(hello.into())).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let text = match ev {
                    Ok(NodeEvent::Gossip { ref topic, .. }) if !wanted.contains(topic.as_str()) => continue,
                    Ok(ev) => event_json(&ev).to_string(),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        json!({ "type": "lagged", "missed": n }).to_string()
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if socket.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
}

fn parse_hash(s: &str) -> Result<BlobHash, ApiError> {
    s.parse()
        .map_err(|e: agentmesh_protocols::blob::ParseHashError| {
            ApiError::bad_request(e.to_string())
        })
}

async fn list_blobs(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        serde_json::to_value(s.store.list()?).unwrap_or_default(),
    ))
}

async fn put_blob(State(s): State<Shared>, body: Body) -> Result<Json<Value>, ApiError> {
    let res = s.store.put(body.into_data_stream()).await?;
    if let Ok(hash) = res.hash.parse::<BlobHash>() {
        s.net.start_providing(hash).await?;
    }
    Ok(Json(serde_json::to_value(res).unwrap_or_default()))
}

async fn fetch_blob(
    State(s): State<Shared>,
    Path(hash): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let hash = parse_hash(&hash)?;
    let report = s.fetcher.fetch(hash).await?;
    Ok(Json(serde_json::to_value(report).unwrap_or_default()))
}

async fn blob_status(
    State(s): State<Shared>,
    Path(hash): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let hash = parse_hash(&hash)?;
    if let Some(m) = s.store.manifest(&hash)? {
        let n = m.chunk_count();
        return Ok(Json(
            json!({"hash": hash.to_string(), "state": "complete", "size": m.size, "chunks_total": n, "chunks_have": n}),
        ));
    }
    if let Some(p) = s.fetcher.progress(&hash) {
        return Ok(Json(
            json!({"hash": hash.to_string(), "state": "fetching", "chunks_total": p.chunks_total, "chunks_have": p.chunks_have}),
        ));
    }
    let state = if s.store.partial_manifest(&hash)?.is_some() {
        "partial"
    } else {
        "absent"
    };
    Ok(Json(json!({"hash": hash.to_string(), "state": state})))
}

async fn blob_providers(
    State(s): State<Shared>,
    Path(hash): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let hash = parse_hash(&hash)?;
    let providers: Vec<String> = s
        .net
        .get_providers(hash)
        .await?
        .iter()
        .map(|p| p.to_string())
        .collect();
    Ok(Json(
        json!({ "hash": hash.to_string(), "providers": providers }),
    ))
}

async fn get_blob(
    State(s): State<Shared>,
    Extension(caller): Extension<auth::Caller>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let hash = parse_hash(&hash)?;
    // Reading what the node holds is a viewer's right; making it download is an operator's.
    if caller.role < agentmesh_consensus::Role::Operator && s.store.manifest(&hash)?.is_none() {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "this node does not hold {hash}; fetching it from the mesh needs the operator role"
            ),
        ));
    }
    s.fetcher.fetch(hash).await?;
    let path = s.store.path(&hash);
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("opening blob: {e}"),
        )
    })?;
    let len = file
        .metadata()
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("opening blob: {e}"),
            )
        })?
        .len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::ETAG, format!("\"{hash}\"")),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn binary_gossip_is_base64() {
        let ev = NodeEvent::Gossip {
            topic: "t".into(),
            from: "p".into(),
            message_id: "m".into(),
            data: vec![0xff, 0xfe],
        };
        let v = event_json(&ev);
        assert_eq!(v["data_b64"], "//4=");
        assert!(v.get("data").is_none());
    }
}
