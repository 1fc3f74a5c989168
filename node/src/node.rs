//! Running a node: open storage, start the swarm, the blob server and the API,
//! announce readiness, and shut down cleanly on SIGINT/SIGTERM.

use crate::{
    api::{self, ApiState},
    blobs::{self, BlobStore, Fetcher},
    config::NodeConfig,
    identity,
    metrics::Metrics,
    network::{self, NetworkParams, INBOUND_BLOB_QUEUE},
    peers::PeerStore,
};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::{path::Path, sync::Arc, time::Duration};
use tokio::sync::{broadcast, mpsc, watch};

/// File in the data dir describing the running node (API address, listen
/// addresses, peer id); written once the node is ready, removed on clean exit.
pub const RUNTIME_FILE: &str = "node.json";
/// Events buffered per `/v1/events` subscriber before it is told it lagged.
const EVENT_BUFFER: usize = 1024;
/// Longest wait for every listener to report its address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a node until SIGINT or SIGTERM.
pub async fn run(config: NodeConfig) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let runtime_file = config.data_dir.join(RUNTIME_FILE);
    let _ = std::fs::remove_file(&runtime_file);

    let api_key = match &config.api_key_file {
        Some(path) => Some(read_api_key(path)?),
        None => None,
    };
    let keypair = identity::load_or_create(&config.data_dir)?;
    let peer_id = keypair.public().to_peer_id();
    let db_path = config.data_dir.join("db");
    let db = sled::open(&db_path).with_context(|| {
        format!(
            "opening the node database {} (is another node running on this data dir?)",
            db_path.display()
        )
    })?;
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let peers = PeerStore::open(&db)?;
    let store = Arc::new(BlobStore::open(
        &db,
        &config.data_dir,
        config.max_blob_size,
    )?);
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_BLOB_QUEUE);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let (net, mut readiness, net_task) = network::spawn(
        NetworkParams {
            keypair,
            name: config.name.clone(),
            listen: config.listen.clone(),
            bootstrap: config.bootstrap.clone(),
            peers,
            metrics: metrics.clone(),
            events: events.clone(),
            inbound_blobs: inbound_tx,
        },
        shutdown_rx.clone(),
    )?;
    tokio::spawn(blobs::serve(
        store.clone(),
        net.clone(),
        inbound_rx,
        config.blob_serve_bytes_per_sec,
    ));
    // Blobs held from before a restart are announced again.
    for hash in store.hashes()? {
        net.start_providing(hash).await?;
    }
    let fetcher = Arc::new(Fetcher::new(store.clone(), net.clone(), metrics.clone()));

    let listener = tokio::net::TcpListener::bind(config.api)
        .await
        .with_context(|| format!("binding the API to {}", config.api))?;
    let api_addr = listener.local_addr()?;
    let state = Arc::new(ApiState {
        net: net.clone(),
        store,
        fetcher,
        metrics,
        events,
        readiness: readiness.clone(),
        api_key,
        name: config.name.clone(),
        expects_peers: !config.bootstrap.is_empty(),
    });
    let mut api_shutdown = shutdown_rx.clone();
    let api_task = tokio::spawn(async move {
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async move {
                let _ = api_shutdown.changed().await;
            })
            .await
    });

    let ready = tokio::time::timeout(LISTEN_TIMEOUT, readiness.wait_for(|r| r.listening))
        .await
        .context("listeners did not report their addresses in time")?
        .context("network task stopped during start-up")?
        .clone();
    let listen_addrs: Vec<String> = ready.listen_addrs.iter().map(|a| a.to_string()).collect();
    write_runtime_file(
        &runtime_file,
        &json!({
            "peer_id": peer_id.to_string(),
            "name": config.name,
            "api": api_addr.to_string(),
            "listen_addrs": listen_addrs,
            "pid": std::process::id(),
        }),
    )?;
    tracing::info!(%peer_id, name = %config.name, api = %api_addr, ?listen_addrs, "node ready");

    wait_for_signal().await?;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = net_task.await;
    match api_task.await {
        Ok(Err(e)) => tracing::warn!(%e, "API server error during shutdown"),
        Err(e) => tracing::warn!(%e, "API task failed"),
        Ok(Ok(())) => {}
    }
    db.flush_async()
        .await
        .context("flushing the node database")?;
    let _ = std::fs::remove_file(&runtime_file);
    tracing::info!("stopped");
    Ok(())
}

fn read_api_key(path: &Path) -> Result<String> {
    let key = std::fs::read_to_string(path)
        .with_context(|| format!("reading API key file {}", path.display()))?;
    let key = key.trim().to_string();
    if key.len() < 16 {
        bail!(
            "API key in {} is too short ({} characters): use at least 16 random characters",
            path.display(),
            key.len()
        );
    }
    Ok(key)
}

fn write_runtime_file(path: &Path, value: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
