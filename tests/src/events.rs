//! The `/v1/events` WebSocket and gossip topics, as tests watch them.

use crate::{wait_until, Node};
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::Value;
use std::time::Duration;
use tokio_tungstenite::{tungstenite::Message, MaybeTlsStream, WebSocketStream};

/// An open `/v1/events` stream.
pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How long [`next_json`] waits for an event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Opens `node`'s event stream for gossip on `topic`; its first event must say `subscribed`.
pub async fn subscribe_ws(node: &Node, topic: &str) -> Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/events?topics={topic}",
        node.info.api
    ))
    .await?;
    let hello = next_json(&mut ws).await?;
    if hello["type"] != "subscribed" {
        bail!("the first event is not `subscribed`: {hello}");
    }
    Ok(ws)
}

/// The next text event, as JSON.
pub async fn next_json(ws: &mut Ws) -> Result<Value> {
    loop {
        let msg = tokio::time::timeout(EVENT_TIMEOUT, ws.next())
            .await
            .with_context(|| format!("no event within {EVENT_TIMEOUT:?}"))?
            .context("event stream closed")??;
        if let Message::Text(t) = msg {
            return Ok(serde_json::from_str(&t)?);
        }
    }
}

/// The next `gossip` event, skipping others.
pub async fn next_gossip(ws: &mut Ws) -> Result<Value> {
    loop {
        let v = next_json(ws).await?;
        if v["type"] == "gossip" {
            return Ok(v);
        }
    }
}

/// Waits until `node`'s gossip layer knows at least `n` subscribers of `topic`.
pub async fn wait_subscribers(node: &Node, topic: &str, n: usize) -> Result<()> {
    wait_until(
        &format!("{} to see {n} subscribers of {topic}", node.name),
        Duration::from_secs(20),
        || async {
            let v = node.get_json(&format!("/v1/topics/{topic}")).await?;
            Ok(v["peers"].as_array().map_or(0, Vec::len) >= n)
        },
    )
    .await
}
