//! Cluster endpoints: `/v1/cluster`, `/v1/cluster/members`, `/v1/tokens`, `/v1/kv`,
//! `/v1/rename`.

use super::{
    auth::{admin_change, Caller},
    read_limited, ApiError, Shared,
};
use agentmesh_consensus::{ClusterError, Rejection, MAX_VALUE_LEN, SECURITY_PREFIX};
use axum::{
    body::Body,
    extract::{DefaultBodyLimit, Extension, Path, Query, State},
    http::StatusCode,
    routing::{delete, get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

/// Largest body of a kv write: the value limit plus room for JSON whitespace.
const MAX_KV_BODY: usize = MAX_VALUE_LEN + 1024;
/// Largest body of the small JSON requests (tokens, rename).
const MAX_SMALL_BODY: usize = 4096;

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        let status = match &e {
            ClusterError::NoLeader(_) | ClusterError::NotMember => StatusCode::SERVICE_UNAVAILABLE,
            ClusterError::Rejected(Rejection::VersionMismatch { .. }) => StatusCode::CONFLICT,
            ClusterError::Rejected(Rejection::NoSuchApiKey(_)) => StatusCode::NOT_FOUND,
            ClusterError::Rejected(Rejection::QuotaExceeded { .. }) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            ClusterError::Rejected(_)
            | ClusterError::Token(_)
            | ClusterError::JoinRefused(_)
            | ClusterError::ClusterKey(_) => StatusCode::FORBIDDEN,
            ClusterError::Invalid(_) => StatusCode::BAD_REQUEST,
            ClusterError::Refused(_) => StatusCode::FORBIDDEN,
            ClusterError::Unavailable(_) => StatusCode::GATEWAY_TIMEOUT,
            ClusterError::Storage(_) | ClusterError::Raft(_) | ClusterError::Config(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self(status, e.to_string())
    }
}

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/tokens", post(token))
        .route("/v1/kv", get(kv_list))
        .route(
            "/v1/kv/{*key}",
            get(kv_get)
                .put(kv_put)
                .delete(kv_delete)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/rename", post(rename))
        .route("/v1/cluster/members/{member}", delete(remove_member))
}

async fn cluster(State(s): State<Shared>) -> Json<Value> {
    let mut v = serde_json::to_value(s.cluster.status()).unwrap_or_default();
    // Nodes that can train, and on what (registered by nodes started with --data).
    let trainers = s
        .cluster
        .read(|st| {
            st.trainers
                .iter()
                .map(|(id, t)| {
                    json!({
                        "node_id": agentmesh_consensus::fmt_node_id(*id),
                        "features": t.features,
                        "classes": t.classes,
                        "examples": t.examples,
                        "kind": t.kind,
                    })
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    v["trainers"] = Value::Array(trainers);
    Json(v)
}

async fn json_body<T: for<'de> Deserialize<'de>>(body: Body, limit: usize) -> Result<T, ApiError> {
    let bytes = read_limited(body, limit).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    ttl_secs: Option<u64>,
}

async fn token(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_limited(body, MAX_SMALL_BODY).await?;
    let req: TokenRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        TokenRequest { ttl_secs: None }
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
    let ttl = Duration::from_secs(req.ttl_secs.unwrap_or(24 * 3600));
    admin_change(&s, &caller, "issuing a join token")?;
    let (token, expires_at) = s
        .cluster
        .issue_token(ttl, &caller.actor, caller.credential.as_ref())
        .await?;
    Ok(Json(json!({ "token": token, "expires_at": expires_at })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    prefix: Option<String>,
}

async fn kv_list(
    State(s): State<Shared>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let entries = s.cluster.kv_list(q.prefix.as_deref().unwrap_or("")).await?;
    let out: Vec<Value> = entries
        .into_iter()
        .map(
            |(key, e)| json!({ "key": key, "value": parse_stored(&e.value), "version": e.version }),
        )
        .collect();
    Ok(Json(Value::Array(out)))
}

/// Values are stored as the JSON text they were written with.
fn parse_stored(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

async fn kv_get(State(s): State<Shared>, Path(key): Path<String>) -> Result<Json<Value>, ApiError> {
    match s.cluster.kv_get(&key).await? {
        Some(e) => Ok(Json(
            json!({ "key": key, "value": parse_stored(&e.value), "version": e.version }),
        )),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no key {key:?}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasQuery {
    if_version: Option<u64>,
}

/// Settings under `security.` are admin changes, whatever path spelled the key.
fn check_security_key(s: &Shared, caller: &Caller, key: &str) -> Result<(), ApiError> {
    if key.starts_with(SECURITY_PREFIX) {
        admin_change(s, caller, &format!("changing {key}"))?;
    }
    Ok(())
}

async fn kv_put(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    Query(q): Query<CasQuery>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let value: Value = json_body(body, MAX_KV_BODY).await?;
    check_security_key(&s, &caller, &key)?;
    let version = s
        .cluster
        .kv_put(
            &key,
            &value,
            q.if_version,
            &caller.actor,
            caller.credential.as_ref(),
        )
        .await?;
    Ok(Json(json!({ "key": key, "version": version })))
}

async fn kv_delete(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    Query(q): Query<CasQuery>,
) -> Result<Json<Value>, ApiError> {
    check_security_key(&s, &caller, &key)?;
    let existed = s
        .cluster
        .kv_delete(
            &key,
            q.if_version,
            &caller.actor,
            caller.credential.as_ref(),
        )
        .await?;
    Ok(Json(json!({ "key": key, "deleted": existed })))
}

async fn remove_member(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(member): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin_change(&s, &caller, "removing a member")?;
    let m = s
        .cluster
        .remove_member(&member, &caller.actor, caller.credential.as_ref())
        .await?;
    Ok(Json(json!({
        "node_id": agentmesh_consensus::fmt_node_id(m.node_id),
        "peer_id": m.peer_id,
        "name": m.name,
        "state": "removed",
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameRequest {
    name: String,
}

async fn rename(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let req: RenameRequest = json_body(body, MAX_SMALL_BODY).await?;
    crate::config::validate_name(&req.name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    s.cluster.rename(&req.name, &caller.actor).await?;
    Ok(Json(json!({ "name": req.name })))
}
