//! Running a node: open storage, start the swarm, the blob server and the API,
//! announce readiness, and shut down cleanly on SIGINT/SIGTERM.

use crate::{
    api::{self, ApiState},
    blobs::{self, BlobStore, Fetcher},
    config::NodeConfig,
    identity,
    jobs::{Jobs, Training},
    metrics::Metrics,
    network::{self, NetworkParams, INBOUND_BLOB_QUEUE},
    peers::PeerStore,
    raft::{self as raft_glue, Entry, MeshTransport},
    sealing::{self, Sealer},
};
use agentmesh_consensus::{Cluster, Durable, Identity};
use agentmesh_federated::{Dataset, ExternalTrainer};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};
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
    let cluster_key = match &config.cluster_key_file {
        Some(path) => Some(load_cluster_key(path)?),
        None => None,
    };
    let keypair = identity::load_or_create(&config.data_dir)?;
    let peer_id = keypair.public().to_peer_id();
    let signing_key = agentmesh_protocols::identity::NodeSigner::from_keypair(&keypair)?
        .signing_key()
        .clone();
    let db_path = config.data_dir.join("db");
    let db = sled::open(&db_path).with_context(|| {
        format!(
            "opening the node database {} (is another node running on this data dir?)",
            db_path.display()
        )
    })?;
    let durable = Durable::new(db.clone(), &db_path)
        .with_context(|| format!("syncing the node database {}", db_path.display()))?;
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let peers = PeerStore::open(&db)?;
    let store = Arc::new(BlobStore::open(
        &durable,
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
    // Registered before the Raft node starts. Until `raft_glue::serve` takes them, one early
    // stream waits and others are dropped unread; their callers see that before sending
    // anything and try again.
    let raft_streams = net
        .stream_control()
        .accept(agentmesh_protocols::raft::PROTOCOL)
        .context("registering the Raft protocol")?;
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

    let ready = tokio::time::timeout(LISTEN_TIMEOUT, readiness.wait_for(|r| r.listening))
        .await
        .context("listeners did not report their addresses in time")?
        .context("network task stopped during start-up")?
        .clone();
    let listen_addrs: Vec<String> = ready.listen_addrs.iter().map(|a| a.to_string()).collect();

    let has_key = cluster_key.is_some();
    let cluster = Cluster::start(
        &config.data_dir.join("raft"),
        Identity {
            peer_id: peer_id.to_string(),
            signing_key: signing_key.clone(),
            name: config.name.clone(),
            addrs: listen_addrs.clone(),
            cluster_key,
        },
        config.raft.clone(),
        Arc::new(MeshTransport::new(net.clone(), metrics.clone())),
    )
    .await
    .context("starting the Raft node")?;
    tokio::spawn(raft_glue::serve(cluster.clone(), raft_streams));
    let sealer = Arc::new(
        Sealer::load_or_create(&config.data_dir, peer_id.to_string(), cluster.node_id())
            .context("loading the sealing keys")?,
    );
    tokio::spawn(sealing::publish(cluster.clone(), sealer.clone()));
    {
        // The mesh serves gossip and blobs to the cluster's members only.
        let mut members = cluster.members_watch();
        let net = net.clone();
        tokio::spawn(async move {
            loop {
                let peers = members.borrow_and_update().as_ref().map(|m| {
                    m.iter()
                        .filter_map(|p| p.parse::<libp2p::PeerId>().ok())
                        .collect()
                });
                net.set_members(peers).await;
                if members.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    {
        // Leader changes go to `/v1/events` subscribers.
        let (cluster, events) = (cluster.clone(), events.clone());
        let mut leader = cluster.leader_watch();
        tokio::spawn(async move {
            while leader.changed().await.is_ok() {
                let id = *leader.borrow_and_update();
                let _ = events.send(network::NodeEvent::LeaderChanged {
                    leader: id.map(agentmesh_consensus::fmt_node_id),
                    leader_peer_id: cluster.status().leader_peer_id,
                });
            }
        });
    }
    let entry = if cluster.had_state() {
        // A token given to a node with state is for coming back after a removal.
        Entry::Resume(config.join.clone())
    } else if let Some(token) = &config.join {
        Entry::Join(token.clone())
    } else if has_key && (config.bootstrap_expect.is_some() || !config.bootstrap.is_empty()) {
        Entry::Key {
            expect: config.bootstrap_expect,
        }
    } else if config.bootstrap.is_empty() {
        Entry::Found
    } else {
        Entry::Wait
    };
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<String>(1);
    {
        let (cluster, net) = (cluster.clone(), net.clone());
        tokio::spawn(async move {
            if let Err(e) = raft_glue::enter(&cluster, &net, entry).await {
                let _ = fatal_tx.send(e.to_string()).await;
            }
        });
    }

    let training = load_training(&config)?;
    let eval = match &config.eval_data {
        Some(path) => Some(
            Dataset::from_csv_path(path, None)
                .with_context(|| format!("loading --eval-data {}", path.display()))?,
        ),
        None => None,
    };
    let jobs = Jobs::start(
        cluster.clone(),
        net.clone(),
        store.clone(),
        fetcher.clone(),
        events.clone(),
        signing_key.clone(),
        sealer.clone(),
        training,
        eval,
    )
    .await
    .context("starting the job service")?;

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
        cluster: cluster.clone(),
        jobs,
        sealer,
        access: api::auth::Access::new(api_key, config.api_rate_limit),
        name: config.name.clone(),
        expects_peers: !config.bootstrap.is_empty(),
    });
    let mut api_shutdown = shutdown_rx.clone();
    let api_task = tokio::spawn(async move {
        let app = api::router(state).into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = api_shutdown.changed().await;
            })
            .await
    });

    // Before anyone can know we are up: scripts and tests stop a node as soon as they read
    // its runtime file.
    let mut signals = Signals::install()?;
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

    let fatal = tokio::select! {
        () = signals.wait() => None,
        Some(msg) = fatal_rx.recv() => Some(msg),
    };
    tracing::info!("shutting down");
    if fatal.is_none() {
        // Hand our vote to the others before going: the cluster stops counting on us.
        if let Err(e) = cluster.leave().await {
            tracing::warn!(error = %e, "leaving the cluster");
        }
    }
    cluster.shutdown().await;
    let _ = shutdown_tx.send(true);
    let _ = net_task.await;
    match api_task.await {
        Ok(Err(e)) => tracing::warn!(%e, "API server error during shutdown"),
        Err(e) => tracing::warn!(%e, "API task failed"),
        Ok(Ok(())) => {}
    }
    durable
        .flush()
        .await
        .context("flushing the node database")?;
    let _ = std::fs::remove_file(&runtime_file);
    if let Some(msg) = fatal {
        bail!("cannot join the cluster: {msg}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Largest API key file read.
const MAX_API_KEY_FILE: u64 = 4096;

fn read_api_key(path: &Path) -> Result<String> {
    check_secret_file(path, "API key")?;
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading API key file {}", path.display()))?
        .len();
    if len > MAX_API_KEY_FILE {
        bail!(
            "API key file {} is {len} bytes; a key is at most {MAX_API_KEY_FILE}",
            path.display()
        );
    }
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

/// Checks the permissions of a file holding a secret. Writable by other users is refused:
/// whoever can rewrite it can replace the secret. Readable by every user is only warned
/// about, because container and Kubernetes secret mounts are often world-readable inside
/// the container.
fn check_secret_file(path: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(()); // the read that follows reports it
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        bail!(
            "{what} file {} is writable by other users (mode {mode:03o}); \
             run chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    if mode & 0o004 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:03o}"),
            "the {what} file is readable by every user; chmod 600 (or 640) it"
        );
    }
    Ok(())
}

fn write_runtime_file(path: &Path, value: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment this is built: a signal that arrives before
/// anyone waits is kept, not left to its default action (which ends the process at once).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Reads the cluster key (see [`check_secret_file`] for the permissions it needs).
fn load_cluster_key(path: &std::path::Path) -> Result<agentmesh_consensus::ClusterKey> {
    check_secret_file(path, "cluster key")?;
    Ok(agentmesh_consensus::ClusterKey::from_file(path)?)
}

/// Loads this node's private training data and trainer, if it has any.
fn load_training(config: &NodeConfig) -> Result<Option<Training>> {
    let Some(path) = &config.data else {
        return Ok(None);
    };
    let data = Dataset::from_csv_path(path, None)
        .with_context(|| format!("loading --data {}", path.display()))?;
    if data.is_empty() {
        bail!("--data {} holds no examples", path.display());
    }
    let external = match &config.trainer_cmd {
        Some(cmd) => {
            let mut words = cmd.split_whitespace().map(str::to_string);
            let program = words
                .next()
                .context("--trainer-cmd is empty: give a program and its arguments")?;
            // The round deadline bounds training too; this is the trainer's own ceiling.
            Some(ExternalTrainer::new(
                program,
                words.collect(),
                Duration::from_secs(3600),
            ))
        }
        None => None,
    };
    if config.byzantine.is_some() {
        tracing::warn!(
            attack = ?config.byzantine,
            "RED-TEAM MODE: this node sends malicious updates (a testing feature)"
        );
    }
    tracing::info!(path = %path.display(), examples = data.len(), features = data.num_features(), "training data loaded");
    Ok(Some(Training {
        data,
        external,
        red_team: config.byzantine,
    }))
}
