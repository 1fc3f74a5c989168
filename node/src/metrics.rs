//! Prometheus metrics of a node, served at `/metrics`.

use prometheus::{Encoder, IntCounter, IntGauge, Registry, TextEncoder};

/// Every metric the node exports.
pub struct Metrics {
    registry: Registry,
    /// Peers with at least one open connection.
    pub connected_peers: IntGauge,
    /// Peers in the peer store.
    pub known_peers: IntGauge,
    /// Gossip messages published by this node.
    pub gossip_published: IntCounter,
    /// Valid gossip messages delivered to this node.
    pub gossip_received: IntCounter,
    /// Gossip messages rejected at validation.
    pub gossip_rejected: IntCounter,
    /// Blob requests refused because the peer is not a member of the cluster.
    pub non_member_refusals: IntCounter,
    /// Raft frames not sent because their caller gave up while the peer was being dialled.
    pub raft_frames_expired: IntCounter,
    /// Raft calls made (Raft RPCs, forwarded requests, joins).
    pub raft_calls: IntCounter,
    /// Raft streams opened; the other calls reused an idle one.
    pub raft_streams_opened: IntCounter,
    /// Blob chunks fetched and verified.
    pub blob_chunks_fetched: IntCounter,
    /// Blob chunks that failed verification.
    pub blob_chunks_corrupt: IntCounter,
    /// Blob bytes fetched from peers (verified).
    pub blob_bytes_fetched: IntCounter,
    /// Blob bytes served to peers.
    pub blob_bytes_served: IntCounter,
    /// Blob requests refused because the serving queue was full.
    pub blob_requests_shed: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// Registers every metric (and the process collector) in a new registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            connected_peers: gauge(
                &r,
                "agentmesh_connected_peers",
                "Peers with an open connection",
            )?,
            known_peers: gauge(&r, "agentmesh_known_peers", "Peers in the peer store")?,
            gossip_published: counter(
                &r,
                "agentmesh_gossip_published_total",
                "Gossip messages published",
            )?,
            gossip_received: counter(
                &r,
                "agentmesh_gossip_received_total",
                "Valid gossip messages received",
            )?,
            gossip_rejected: counter(
                &r,
                "agentmesh_gossip_rejected_total",
                "Gossip messages rejected at validation",
            )?,
            non_member_refusals: counter(
                &r,
                "agentmesh_non_member_refusals_total",
                "Blob requests refused because the peer is not a member of the cluster",
            )?,
            raft_frames_expired: counter(
                &r,
                "agentmesh_raft_frames_expired_total",
                "Raft frames not sent because their caller gave up while the peer was being dialled",
            )?,
            raft_calls: counter(
                &r,
                "agentmesh_raft_calls_total",
                "Raft calls made (Raft RPCs, forwarded requests, joins)",
            )?,
            raft_streams_opened: counter(
                &r,
                "agentmesh_raft_streams_opened_total",
                "Raft streams opened; the other calls reused an idle one",
            )?,
            blob_chunks_fetched: counter(
                &r,
                "agentmesh_blob_chunks_fetched_total",
                "Blob chunks fetched and verified",
            )?,
            blob_chunks_corrupt: counter(
                &r,
                "agentmesh_blob_chunks_corrupt_total",
                "Blob chunks that failed verification",
            )?,
            blob_bytes_fetched: counter(
                &r,
                "agentmesh_blob_bytes_fetched_total",
                "Verified blob bytes fetched",
            )?,
            blob_bytes_served: counter(
                &r,
                "agentmesh_blob_bytes_served_total",
                "Blob bytes served to peers",
            )?,
            blob_requests_shed: counter(
                &r,
                "agentmesh_blob_requests_shed_total",
                "Blob requests refused: serving queue full",
            )?,
            registry: r,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
