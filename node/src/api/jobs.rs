//! Job endpoints: `/v1/jobs`, `/v1/jobs/{id}`, `/v1/jobs/{id}/cancel`, `/v1/jobs/{id}/verify`,
//! and `/v1/models/{hash}`.

use super::{auth::Caller, read_limited, ApiError, Shared};
use crate::jobs::JobError;
use agentmesh_consensus::MAX_JOB_SPEC_LEN;
use axum::{
    body::Body,
    extract::{DefaultBodyLimit, Extension, Path, Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::Value;

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            JobError::NotFound(id) => ApiError(StatusCode::NOT_FOUND, format!("no job {id}")),
            JobError::Cluster(c) => c.into(),
            JobError::Blob(m) => ApiError(StatusCode::BAD_GATEWAY, format!("blob: {m}")),
            JobError::Internal(m) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, m),
        }
    }
}

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/jobs",
            get(list).post(submit).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/verify", post(verify))
        .route("/v1/models/{hash}", get(model))
}

async fn submit(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let bytes = read_limited(body, MAX_JOB_SPEC_LEN).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("the job spec is not UTF-8 text"))?;
    Ok((
        StatusCode::CREATED,
        Json(s.jobs.submit(text, &caller.actor).await?),
    ))
}

async fn list(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    Ok(Json(Value::Array(s.jobs.list()?)))
}

async fn job(State(s): State<Shared>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.jobs.get(&id)?))
}

async fn cancel(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.jobs.cancel(&id, &caller.actor).await?))
}

#[derive(Deserialize)]
struct VerifyQuery {
    round: Option<u32>,
}

async fn verify(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<VerifyQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.jobs.verify(&id, q.round).await?))
}

/// A model by hash, or a job's current model by job id.
async fn model(State(s): State<Shared>, Path(key): Path<String>) -> Result<Response, ApiError> {
    let hash = if key.len() == 64 {
        key
    } else {
        let job = s.jobs.get(&key)?;
        job["model_hash"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("job {key} has no model yet")))?
    };
    let bytes = s.jobs.model_bytes(&hash).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::HeaderName::from_static("x-model-hash"), hash),
        ],
        bytes,
    )
        .into_response())
}
