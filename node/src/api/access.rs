//! API keys and the audit log: `/v1/apikeys` and `/v1/audit` (admin only).

use super::{
    auth::{admin_change, Caller},
    read_limited, ApiError, Shared,
};
use agentmesh_consensus::{ApiKeyRecord, Role, MAX_AUDIT_READ};
use axum::{
    body::Body,
    extract::{Extension, Path, Query, State},
    http::StatusCode,
    routing::{delete, get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

/// Largest body of `POST /v1/apikeys`.
const MAX_KEY_BODY: usize = 4096;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/apikeys", get(list).post(create))
        .route("/v1/apikeys/{id}", delete(revoke))
        .route("/v1/audit", get(audit))
        .route("/v1/keys", get(seal_keys))
        .route("/v1/keys/rotate", post(rotate_seal_key))
}

/// Every member's published sealing keys (ids and times; the current one last).
async fn seal_keys(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    let members = s.cluster.read(|st| {
        st.members
            .values()
            .map(|m| {
                let keys: Vec<Value> = m
                    .seal_keys
                    .iter()
                    .filter_map(|k| {
                        let public = k.public_bytes()?;
                        Some(json!({
                            "key_id": hex::encode(agentmesh_protocols::seal::key_id(&public)),
                            "created_at_ms": k.created_at_ms,
                        }))
                    })
                    .collect();
                json!({
                    "node_id": agentmesh_consensus::fmt_node_id(m.node_id),
                    "peer_id": m.peer_id,
                    "name": m.name,
                    "state": m.state,
                    "keys": keys,
                })
            })
            .collect::<Vec<Value>>()
    })?;
    Ok(Json(Value::Array(members)))
}

/// Makes this node a new sealing key, stores it and publishes it. The older secrets stay, so
/// what was sealed for them still opens: nothing stops.
async fn rotate_seal_key(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    if !s.cluster.is_member() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is not a cluster member yet".into(),
        ));
    }
    let (sealer, floor) = (s.sealer.clone(), s.sealer.next_key_floor(&s.cluster));
    let (secret, created_at_ms) = tokio::task::spawn_blocking(move || sealer.rotate(floor))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let key_id = hex::encode(secret.id());
    // Stored first, so a published key always has its secret. Until the key is published
    // the node goes on sealing with the old one, and publishes the new one when it can.
    s.cluster
        .publish_seal_key(
            secret.public(),
            created_at_ms,
            &format!("key {key_id}"),
            &caller.actor,
        )
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "key {key_id} is stored but not yet published ({e}); this node publishes \
                     it as soon as it can"
                ),
            )
        })?;
    Ok(Json(json!({
        "node_id": agentmesh_consensus::fmt_node_id(s.cluster.node_id()),
        "key_id": key_id,
        "created_at_ms": created_at_ms,
    })))
}

/// A key record as the API shows it: never the hash.
fn key_json(k: &ApiKeyRecord) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "role": k.role,
        "created_at_ms": k.created_at_ms,
        "created_by": k.created_by,
        "revoked_at_ms": k.revoked_at_ms,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    role: String,
    #[serde(default)]
    name: String,
}

async fn create(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let bytes = read_limited(body, MAX_KEY_BODY).await?;
    let req: CreateRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let role: Role = req.role.parse().map_err(ApiError::bad_request)?;
    admin_change(&s, &caller, "creating an API key")?;
    let new = s
        .cluster
        .create_api_key(&req.name, role, &caller.actor, caller.credential.as_ref())
        .await?;
    let mut v = key_json(&new.record);
    v["key"] = json!(new.key);
    Ok((StatusCode::CREATED, Json(v)))
}

async fn list(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    let keys = s.cluster.api_keys()?;
    Ok(Json(Value::Array(keys.iter().map(key_json).collect())))
}

async fn revoke(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin_change(&s, &caller, "revoking an API key")?;
    s.cluster
        .revoke_api_key(&id, &caller.actor, caller.credential.as_ref())
        .await?;
    Ok(Json(json!({ "id": id, "revoked": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Entries after this sequence number.
    #[serde(default)]
    after: u64,
    /// Entries at or after this time (unix milliseconds).
    #[serde(default)]
    since_ms: u64,
    /// At most this many (default and cap: 1000).
    limit: Option<u32>,
}

async fn audit(
    State(s): State<Shared>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let entries = s
        .cluster
        .audit_log(q.after, q.since_ms, q.limit.unwrap_or(MAX_AUDIT_READ))
        .await?;
    Ok(Json(serde_json::to_value(entries).unwrap_or_default()))
}
