//! Who is calling and what they may do: the API's authentication, roles and rate limits.
//!
//! A request presents `Authorization: Bearer KEY`. The key is either the node's admin key
//! (`--api-key-file`) or an API key created with `agentmesh apikey create`, checked against
//! the replicated key records. A node started without `--api-key-file` listens on loopback
//! only, and there a request without a key acts as a local admin; a key that is presented is
//! still checked and its role applies. Every route needs a role ([`required_role`]): 401
//! without a valid key, 403 with one whose role is too low, 429 with `Retry-After` past the
//! key's rate. Refusals go to the audit log, coalesced so a flood costs a few entries.
//!
//! Admin changes to the cluster (API keys, join tokens, removals, `security.*` settings) go
//! through [`admin_change`]: with `security.admin_requires_key` on, only a replicated admin
//! API key may make them, and the key goes with the change to the leader, which checks it
//! again (`consensus/src/cluster/forwarded.rs`).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use agentmesh_consensus::{Credential, Role, ADMIN_REQUIRES_KEY};
use axum::{
    extract::{ConnectInfo, MatchedPath, Request, State},
    http::{header, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::{ApiError, Shared};

/// The authenticated caller of one request, for handlers that record who did something.
#[derive(Debug, Clone)]
pub struct Caller {
    /// As the audit log names it: `apikey:<id>`, `admin-key` or `local`.
    pub actor: String,
    /// What it may do.
    pub role: Role,
    /// The replicated API key it presented, passed on with admin changes; `None` for the
    /// node's own admin key and keyless local callers, whom only this node vouches for.
    pub credential: Option<Credential>,
}

/// The API's access rules on one node.
pub struct Access {
    /// The node's admin key (`--api-key-file`); without one, keyless requests are local admins.
    admin_key: Option<String>,
    /// Per-caller request rate; `None`: unlimited.
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

impl Access {
    /// Rules for a node with `admin_key`, allowing `rate` requests per second per key (0: no
    /// limit) with bursts of twice that.
    pub fn new(admin_key: Option<String>, rate: u32) -> Self {
        let limiter = NonZeroU32::new(rate).map(|r| {
            let burst = r.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
            RateLimiter::keyed(Quota::per_second(r).allow_burst(burst))
        });
        Self { admin_key, limiter }
    }
}

/// The role a request needs: reads need `viewer`; the audit log and API keys, tokens and
/// membership need `admin`; every other change needs `operator`.
pub fn required_role(method: &Method, path: &str) -> Role {
    let admin_area = [
        "/v1/apikeys",
        "/v1/audit",
        "/v1/tokens",
        "/v1/rename",
        "/v1/keys",
        "/v1/cluster/members",
    ]
    .iter()
    .any(|p| path == *p || path.starts_with(&format!("{p}/")));
    if admin_area {
        Role::Admin
    } else if method == Method::GET || method == Method::HEAD {
        Role::Viewer
    } else {
        Role::Operator
    }
}

/// Why a request was refused before it reached its handler.
enum Refusal {
    NoKey,
    BadKey,
    Forbidden { have: Role, need: Role },
    Limited(Duration),
}

/// Whether a keyless request really comes from a program on this machine, not from a web
/// page in a browser here: browsers send `Origin` on cross-site requests and WebSockets,
/// and a page that rebinds its own DNS name to 127.0.0.1 still sends that name as `Host`.
fn plainly_local(headers: &axum::http::HeaderMap) -> bool {
    if headers.contains_key(header::ORIGIN) {
        return false;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return true;
    };
    // `127.0.0.1:7070`, `[::1]:7070`, `localhost:7070`, with or without the port.
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Who presents `bearer`, if anyone acceptable.
fn identify(
    s: &Shared,
    bearer: Option<&str>,
    headers: &axum::http::HeaderMap,
) -> Result<Caller, Refusal> {
    let access = &s.access;
    match bearer {
        None if access.admin_key.is_none() && plainly_local(headers) => Ok(Caller {
            actor: "local".into(),
            role: Role::Admin,
            credential: None,
        }),
        None => Err(Refusal::NoKey),
        Some(key) => {
            if access
                .admin_key
                .as_deref()
                .is_some_and(|admin| super::constant_time_eq(key.as_bytes(), admin.as_bytes()))
            {
                return Ok(Caller {
                    actor: "admin-key".into(),
                    role: Role::Admin,
                    credential: None,
                });
            }
            match s.cluster.authenticate(key) {
                Some(record) => Ok(Caller {
                    actor: format!("apikey:{}", record.id),
                    role: record.role,
                    credential: Some(Credential::new(key)),
                }),
                None => Err(Refusal::BadKey),
            }
        }
    }
}

/// The middleware: authenticates, checks the role and the rate, then runs the handler with
/// the [`Caller`] in the request's extensions.
pub(super) async fn authorize(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let need = required_role(req.method(), req.uri().path());
    let outcome = identify(&s, bearer, req.headers()).and_then(|caller| {
        if caller.role < need {
            return Err(Refusal::Forbidden {
                have: caller.role,
                need,
            });
        }
        // Keyless local callers are the operator at the machine: not limited.
        if let (Some(limiter), false) = (&s.access.limiter, caller.actor == "local") {
            if let Err(not_until) = limiter.check_key(&caller.actor) {
                let clock = governor::clock::DefaultClock::default();
                return Err(Refusal::Limited(not_until.wait_time_from(clock.now())));
            }
        }
        Ok(caller)
    });
    match outcome {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(refusal) => refuse(&s, &req, bearer, refusal),
    }
}

fn refuse(s: &Shared, req: &Request, bearer: Option<&str>, refusal: Refusal) -> Response {
    let from = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string());
    // The route, not the raw path: a client must not be able to make every refusal distinct.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("?", MatchedPath::as_str);
    let what = format!("{} {route}", req.method());
    // The log names a valid key by its id only, never the secret. (A refused key's id is
    // left out: a client could vary it to make every refusal distinct.)
    let key_id = bearer
        .and_then(agentmesh_consensus::api_key_id)
        .unwrap_or("-");
    let (status, message, detail) = match refusal {
        Refusal::NoKey if s.access.admin_key.is_none() => (
            StatusCode::UNAUTHORIZED,
            "requests from web pages (with an Origin, or a Host that is not loopback) need an \
             API key: send Authorization: Bearer KEY"
                .to_string(),
            "no key, not plainly local".to_string(),
        ),
        Refusal::NoKey => (
            StatusCode::UNAUTHORIZED,
            "an API key is required: send Authorization: Bearer KEY".to_string(),
            "no key".to_string(),
        ),
        Refusal::BadKey => (
            StatusCode::UNAUTHORIZED,
            "unknown, revoked or malformed API key".to_string(),
            "bad key".to_string(),
        ),
        Refusal::Forbidden { have, need } => (
            StatusCode::FORBIDDEN,
            format!("{what} needs the {need} role; this key is {have}"),
            format!("{have} key {key_id} needs {need}"),
        ),
        Refusal::Limited(wait) => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut res = ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!("rate limit exceeded; retry in {secs} s"),
            )
            .into_response();
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return res;
        }
    };
    let actor = format!("client:{from}");
    let entry = s
        .cluster
        .audit_entry(&actor, "auth.rejected", &what, &detail)
        .with_outcome(&format!("refused: {}", status.as_u16()));
    s.cluster.audit_later(entry);
    let mut res = ApiError(status, message).into_response();
    if status == StatusCode::UNAUTHORIZED {
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    res
}

/// Whether `caller` may make an admin change to the cluster (`what`, for the audit log): it
/// needs the admin role and, with [`ADMIN_REQUIRES_KEY`] on, a replicated admin API key. A
/// handler calls this with the decoded target, so an encoded path cannot slip past it.
pub(super) fn admin_change(s: &Shared, caller: &Caller, what: &str) -> Result<(), ApiError> {
    let message = if caller.role < Role::Admin {
        format!("{what} needs the admin role; this key is {}", caller.role)
    } else if caller.credential.is_none() && s.cluster.admin_requires_key() {
        format!(
            "{what} needs an admin API key: {ADMIN_REQUIRES_KEY} is on, so this node's own \
             key and keyless local calls may not make admin changes"
        )
    } else {
        return Ok(());
    };
    let entry = s
        .cluster
        .audit_entry(&caller.actor, "auth.rejected", what, &message)
        .with_outcome("refused: 403");
    s.cluster.audit_later(entry);
    Err(ApiError(StatusCode::FORBIDDEN, message))
}

/// Forgets rate-limit state of callers that have been quiet, so the table stays small.
pub(super) fn spawn_limiter_cleanup(s: Shared) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Some(l) = &s.access.limiter {
                l.retain_recent();
                l.shrink_to_fit();
            }
            if std::sync::Arc::strong_count(&s) == 1 {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_route_table() {
        let get = Method::GET;
        let post = Method::POST;
        let put = Method::PUT;
        let delete = Method::DELETE;
        assert_eq!(required_role(&get, "/v1/status"), Role::Viewer);
        assert_eq!(required_role(&get, "/v1/jobs/abc"), Role::Viewer);
        assert_eq!(required_role(&get, "/v1/kv/a/b"), Role::Viewer);
        assert_eq!(required_role(&get, "/v1/events"), Role::Viewer);
        assert_eq!(required_role(&put, "/v1/kv/a"), Role::Operator);
        assert_eq!(required_role(&delete, "/v1/kv/a"), Role::Operator);
        assert_eq!(required_role(&post, "/v1/jobs"), Role::Operator);
        assert_eq!(required_role(&post, "/v1/blobs"), Role::Operator);
        assert_eq!(
            required_role(&post, "/v1/topics/t/messages"),
            Role::Operator
        );
        assert_eq!(required_role(&post, "/v1/tokens"), Role::Admin);
        assert_eq!(required_role(&post, "/v1/rename"), Role::Admin);
        assert_eq!(required_role(&get, "/v1/apikeys"), Role::Admin);
        assert_eq!(required_role(&delete, "/v1/apikeys/abc"), Role::Admin);
        assert_eq!(required_role(&get, "/v1/audit"), Role::Admin);
        // A prefix is not a match: /v1/auditx is not the audit log.
        assert_eq!(required_role(&get, "/v1/auditx"), Role::Viewer);
    }

    #[test]
    fn only_plainly_local_requests_go_keyless() {
        let h = |pairs: &[(header::HeaderName, &str)]| {
            let mut m = axum::http::HeaderMap::new();
            for (k, v) in pairs {
                if let Ok(v) = v.parse() {
                    m.insert(k.clone(), v);
                }
            }
            m
        };
        for host in [
            "127.0.0.1:7070",
            "localhost:7070",
            "[::1]:7070",
            "127.0.0.1",
            "LOCALHOST",
        ] {
            assert!(plainly_local(&h(&[(header::HOST, host)])), "{host}");
        }
        assert!(plainly_local(&h(&[])));
        for host in [
            "evil.example:7070",
            "10.0.0.5:7070",
            "[2001:db8::1]:7070",
            "localhost.evil",
        ] {
            assert!(!plainly_local(&h(&[(header::HOST, host)])), "{host}");
        }
        let from_page = h(&[
            (header::HOST, "127.0.0.1:7070"),
            (header::ORIGIN, "https://evil.example"),
        ]);
        assert!(!plainly_local(&from_page));
    }

    #[test]
    fn limits_allow_a_burst_then_refuse() {
        let a = Access::new(None, 2);
        let l = a.limiter.as_ref().map(|l| {
            (0..4)
                .map(|_| l.check_key(&"k".to_string()).is_ok())
                .collect::<Vec<_>>()
        });
        assert_eq!(l, Some(vec![true, true, true, true]));
        let refused = a
            .limiter
            .as_ref()
            .is_some_and(|l| l.check_key(&"k".to_string()).is_err());
        assert!(
            refused,
            "the fifth request within the burst of 4 is refused"
        );
        assert!(Access::new(None, 0).limiter.is_none());
    }
}
