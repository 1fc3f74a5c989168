//! Raft messages on long-lived libp2p streams (`/agentmesh/raft/2.0.0`, wire in
//! `protocols/src/raft.rs`).
//!
//! A call takes an idle stream to its peer from a pool (or opens one), writes the request,
//! reads the response and puts the stream back. The bytes go between the caller's task and
//! the connection without crossing the swarm task, and a reused stream needs no opening or
//! protocol negotiation. Raft's commit latency is a sum of such calls, and a forwarded client
//! write adds two more, so this is on every write's path.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agentmesh_consensus::Cluster;
use agentmesh_protocols::raft as wire;
use futures::{AsyncReadExt, FutureExt, StreamExt};
use libp2p::{Multiaddr, PeerId, Stream};
use libp2p_stream::{Control, IncomingStreams};
use tokio::sync::Semaphore;

use crate::{
    metrics::Metrics,
    network::{NetworkError, NetworkHandle},
};

/// Idle streams kept per peer; more are closed after their call.
const MAX_IDLE_PER_PEER: usize = 64;
/// Calls in flight to one peer; more wait for one to finish. With the idle streams this
/// stays below what the peer accepts from us ([`MAX_INBOUND_PER_PEER`]), so a burst waits
/// here instead of having its streams dropped there.
const MAX_CALLS_PER_PEER: usize = 128;
/// An idle stream older than this is closed rather than reused. The accepting side waits
/// longer ([`INBOUND_IDLE`]) before it closes one, so a stream taken from the pool is never
/// one the peer is closing at that moment.
const OUTBOUND_IDLE: Duration = Duration::from_secs(30);
/// How long an accepted stream may wait for its next request.
const INBOUND_IDLE: Duration = Duration::from_secs(90);
/// How long an answer may take to leave; a peer that stops reading loses the stream.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one peer may hold open to us at once; past it new ones are dropped unread.
const MAX_INBOUND_PER_PEER: usize = 256;
/// Requests handled at once, from all peers; more wait.
const MAX_CONCURRENT_RPCS: usize = 256;
/// Fresh streams a call opens when the peer drops them before greeting (nothing was sent:
/// its accept queue holds one stream at a time, so a burst of opens can overflow it).
const OPEN_ATTEMPTS: u32 = 5;
/// Pause before the second attempt; doubled for each one after.
const OPEN_BACKOFF: Duration = Duration::from_millis(5);

/// The calling side: a pool of idle streams per peer.
#[derive(Clone)]
pub(crate) struct RaftStreams {
    net: NetworkHandle,
    control: Control,
    metrics: Arc<Metrics>,
    pool: Arc<Mutex<Pool>>,
}

#[derive(Default)]
struct Pool {
    idle: HashMap<PeerId, Vec<(Stream, Instant)>>,
    calls: HashMap<PeerId, Arc<Semaphore>>,
    /// When stale streams of every peer were last dropped.
    swept: Option<Instant>,
}

impl RaftStreams {
    pub(crate) fn new(net: NetworkHandle, metrics: Arc<Metrics>) -> Self {
        Self {
            control: net.stream_control(),
            net,
            metrics,
            pool: Arc::default(),
        }
    }

    /// Sends `request` to `peer` and returns its answer. Dropping the future abandons the
    /// call: its stream is dropped, never reused. An error that says the peer is
    /// unreachable means the request was not sent.
    pub(crate) async fn call(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: &[u8],
    ) -> Result<Vec<u8>, NetworkError> {
        self.metrics.raft_calls.inc();
        let calls = self
            .lock()
            .calls
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_CALLS_PER_PEER)))
            .clone();
        let _permit = calls
            .acquire_owned()
            .await
            .map_err(|_| NetworkError::Stopped)?;
        let idle = self.lock().take_idle(peer);
        let mut stream = match idle {
            Some(stream) => stream,
            None => self.open(peer, addrs).await?,
        };
        let reply = wire::call(&mut stream, request)
            .await
            .map_err(|e| NetworkError::Request {
                peer,
                reason: format!("raft stream: {e}"),
            })?;
        self.lock().put_idle(peer, stream);
        Ok(reply)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh stream the peer has greeted. The connection is made through the swarm task,
    /// with the member's known addresses, and only while the caller still waits. Nothing
    /// has been sent when this fails, so its error says "unreachable".
    async fn open(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<Stream, NetworkError> {
        self.net.raft_connect(peer, addrs).await?;
        let mut last = String::new();
        for attempt in 0..OPEN_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(OPEN_BACKOFF * 2u32.pow(attempt - 1)).await;
            }
            let mut control = self.control.clone();
            match control.open_stream(peer, wire::PROTOCOL).await {
                Ok(mut stream) => match wire::await_greeting(&mut stream).await {
                    Ok(()) => {
                        self.metrics.raft_streams_opened.inc();
                        return Ok(stream);
                    }
                    Err(e) => last = format!("stream not taken up: {e}"),
                },
                Err(e) => last = e.to_string(),
            }
        }
        Err(NetworkError::Unreachable {
            peer,
            reason: format!("cannot open a raft stream: {last}"),
        })
    }
}

impl Pool {
    fn take_idle(&mut self, peer: PeerId) -> Option<Stream> {
        let streams = self.idle.get_mut(&peer)?;
        while let Some((mut stream, since)) = streams.pop() {
            if since.elapsed() < OUTBOUND_IDLE && is_open(&mut stream) {
                return Some(stream);
            }
        }
        None
    }

    fn put_idle(&mut self, peer: PeerId, stream: Stream) {
        let now = Instant::now();
        // Streams of peers no longer called (members gone) are dropped too, now and then.
        if self
            .swept
            .is_none_or(|t| now.duration_since(t) > OUTBOUND_IDLE)
        {
            self.idle.retain(|_, streams| {
                streams.retain(|(_, since)| now.duration_since(*since) < OUTBOUND_IDLE);
                !streams.is_empty()
            });
            self.calls
                .retain(|_, calls| calls.available_permits() < MAX_CALLS_PER_PEER);
            self.swept = Some(now);
        }
        let streams = self.idle.entry(peer).or_default();
        streams.retain(|(_, since)| now.duration_since(*since) < OUTBOUND_IDLE);
        if streams.len() < MAX_IDLE_PER_PEER {
            streams.push((stream, now));
        }
    }
}

/// An idle stream has nothing to read: readable bytes or an end mean the peer closed or
/// broke it (its connection went away, or it timed the stream out).
fn is_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    stream.read(&mut byte).now_or_never().is_none()
}

/// Answers inbound Raft streams until the node stops: each stream is taken up and its
/// requests answered one after another until the peer closes it or it idles out.
pub async fn serve(cluster: Cluster, mut incoming: IncomingStreams) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_RPCS));
    let open: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
    while let Some((peer, stream)) = incoming.next().await {
        let Some(key) = super::peer_public_key(&peer) else {
            // Not an Ed25519 identity: cannot be a member. Dropping the stream refuses it.
            tracing::debug!(%peer, "raft stream from a non-Ed25519 peer");
            continue;
        };
        let Some(slot) = Slot::take(&open, peer) else {
            tracing::debug!(%peer, "too many raft streams from one peer; dropping one");
            continue;
        };
        tokio::spawn(answer(
            cluster.clone(),
            peer,
            key,
            stream,
            permits.clone(),
            slot,
        ));
    }
}

async fn answer(
    cluster: Cluster,
    peer: PeerId,
    key: [u8; 32],
    mut stream: Stream,
    permits: Arc<Semaphore>,
    _slot: Slot,
) {
    if let Err(e) = wire::greet(&mut stream).await {
        tracing::debug!(%peer, error = %e, "raft stream closed before the greeting");
        return;
    }
    let who = peer.to_string();
    loop {
        let request = match tokio::time::timeout(INBOUND_IDLE, wire::read_frame(&mut stream)).await
        {
            Ok(Ok(request)) => request,
            Ok(Err(e)) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::debug!(%peer, error = %e, "raft stream dropped");
                }
                return;
            }
            Err(_) => return,
        };
        let Ok(permit) = permits.acquire().await else {
            return;
        };
        let reply = cluster.handle_rpc(&who, &key, &request).await;
        drop(permit);
        match tokio::time::timeout(ANSWER_TIMEOUT, wire::write_frame(&mut stream, &reply)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "raft answer not delivered");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "raft answer not taken in time; dropping the stream");
                return;
            }
        }
    }
}

/// One of a peer's inbound stream slots, given back when dropped.
struct Slot {
    open: Arc<Mutex<HashMap<PeerId, usize>>>,
    peer: PeerId,
}

impl Slot {
    fn take(open: &Arc<Mutex<HashMap<PeerId, usize>>>, peer: PeerId) -> Option<Self> {
        let mut map = open.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(peer).or_default();
        if *n >= MAX_INBOUND_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Self {
            open: open.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}
