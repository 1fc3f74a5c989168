//! `agentmesh apikey ...` and `agentmesh audit`.

use super::{s, Api};
use anyhow::Result;
use serde_json::{json, Value};

pub(super) async fn create(api: &Api, role: &str, name: &str) -> Result<()> {
    let body = json!({ "role": role, "name": name });
    let v = api
        .json(
            api.request(reqwest::Method::POST, "/v1/apikeys")
                .json(&body),
        )
        .await?;
    if api.json {
        api.print_json(&v);
        return Ok(());
    }
    eprintln!(
        "API key {} ({}), shown this once; send it as Authorization: Bearer KEY or --api-key:",
        s(&v, "id"),
        s(&v, "role")
    );
    println!("{}", s(&v, "key"));
    Ok(())
}

pub(super) async fn list(api: &Api) -> Result<()> {
    let v = api
        .json(api.request(reqwest::Method::GET, "/v1/apikeys"))
        .await?;
    if api.json {
        api.print_json(&v);
        return Ok(());
    }
    println!(
        "{:<14} {:<9} {:<20} {:<20} {:<20} NAME",
        "ID", "ROLE", "CREATED", "BY", "REVOKED"
    );
    for k in v.as_array().into_iter().flatten() {
        let revoked = k["revoked_at_ms"].as_u64().map_or("-".to_string(), time);
        println!(
            "{:<14} {:<9} {:<20} {:<20} {:<20} {}",
            s(k, "id"),
            s(k, "role"),
            time(k["created_at_ms"].as_u64().unwrap_or(0)),
            s(k, "created_by"),
            revoked,
            s(k, "name")
        );
    }
    Ok(())
}

pub(super) async fn rotate_key(api: &Api) -> Result<()> {
    let v = api
        .json(api.request(reqwest::Method::POST, "/v1/keys/rotate"))
        .await?;
    if api.json {
        api.print_json(&v);
    } else {
        println!(
            "{} now seals with key {}",
            s(&v, "node_id"),
            s(&v, "key_id")
        );
    }
    Ok(())
}

pub(super) async fn keys(api: &Api) -> Result<()> {
    let v = api
        .json(api.request(reqwest::Method::GET, "/v1/keys"))
        .await?;
    if api.json {
        api.print_json(&v);
        return Ok(());
    }
    println!(
        "{:<18} {:<12} {:<18} {:<20} NAME",
        "NODE", "STATE", "KEY", "CREATED"
    );
    for m in v.as_array().into_iter().flatten() {
        let current = m["keys"].as_array().and_then(|k| k.last());
        println!(
            "{:<18} {:<12} {:<18} {:<20} {}",
            s(m, "node_id"),
            s(m, "state"),
            current.map_or("-".to_string(), |k| s(k, "key_id").to_string()),
            current
                .and_then(|k| k["created_at_ms"].as_u64())
                .map_or("-".to_string(), time),
            s(m, "name")
        );
    }
    Ok(())
}

pub(super) async fn revoke(api: &Api, id: &str) -> Result<()> {
    let v = api
        .json(api.request(reqwest::Method::DELETE, &format!("/v1/apikeys/{id}")))
        .await?;
    if api.json {
        api.print_json(&v);
    } else {
        println!("revoked {id}");
    }
    Ok(())
}

/// The newest `limit` entries from `since_ms` on: pages through the log (oldest first) and
/// keeps the tail.
pub(super) async fn audit(api: &Api, since_ms: u64, limit: u32) -> Result<()> {
    let mut entries: std::collections::VecDeque<Value> = Default::default();
    let mut after = 0u64;
    loop {
        let page = api
            .json(api.request(
                reqwest::Method::GET,
                &format!("/v1/audit?after={after}&since_ms={since_ms}"),
            ))
            .await?;
        let page = page.as_array().cloned().unwrap_or_default();
        let Some(last) = page.last().and_then(|e| e["seq"].as_u64()) else {
            break;
        };
        after = last;
        for e in page {
            entries.push_back(e);
            if entries.len() > limit as usize {
                entries.pop_front();
            }
        }
    }
    if api.json {
        api.print_json(&Value::Array(entries.into()));
        return Ok(());
    }
    println!(
        "{:<6} {:<20} {:<22} {:<15} {:<24} {:<10} DETAIL",
        "SEQ", "TIME (UTC)", "ACTOR", "ACTION", "TARGET", "OUTCOME"
    );
    for e in &entries {
        println!(
            "{:<6} {:<20} {:<22} {:<15} {:<24} {:<10} {}",
            e["seq"].as_u64().unwrap_or(0),
            time(e["at_ms"].as_u64().unwrap_or(0)),
            short(s(e, "actor"), 22),
            s(e, "action"),
            short(s(e, "target"), 24),
            s(e, "outcome"),
            s(e, "detail")
        );
    }
    Ok(())
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC.
fn time(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || ms.to_string(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
        )
}

/// `text` cut to `n` characters, with an ellipsis when cut.
fn short(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        text.to_string()
    } else {
        let mut out: String = text.chars().take(n - 1).collect();
        out.push('…');
        out
    }
}
