//! A hand-made libp2p peer that speaks only gossipsub, configured as nodes configure it
//! (anonymous, content-hash message ids), for tests of what nodes do with gossip they
//! would never publish themselves: forged, re-addressed or replayed envelopes.

use std::time::Duration;

use agentmesh_protocols::gossip_message_id;
use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use libp2p::{
    gossipsub::{self, IdentTopic},
    identity::Keypair,
    swarm::{dial_opts::DialOpts, SwarmEvent},
    Multiaddr, PeerId,
};
use tokio::sync::{mpsc, oneshot};

/// How long a step may take before the peer gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

enum Command {
    /// Dial `peer` at `addr`, subscribe to `topic`, and answer once `peer` is known to
    /// subscribe to it too (so a publish reaches it).
    Join(PeerId, Multiaddr, String, oneshot::Sender<Result<()>>),
    /// Publish raw bytes on a topic.
    Publish(String, Vec<u8>, oneshot::Sender<Result<()>>),
}

/// A gossip-only peer with a given identity. Its swarm runs in a task of its own, ended
/// when the peer is dropped.
pub struct RawGossipPeer {
    commands: mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawGossipPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawGossipPeer {
    /// Builds the peer; it listens nowhere and only dials.
    pub fn new(identity: Keypair) -> Result<Self> {
        let config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Anonymous)
            .message_id_fn(gossip_message_id)
            .flood_publish(true)
            .build()
            .map_err(|e| anyhow!("gossipsub config: {e}"))?;
        let behaviour: gossipsub::Behaviour =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, config)
                .map_err(|e| anyhow!("gossipsub: {e}"))?;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
            .with_tokio()
            .with_tcp(
                Default::default(),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )?
            .with_behaviour(|_| behaviour)
            .map_err(|e| anyhow!("gossipsub: {e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let (commands, mut rx) = mpsc::channel::<Command>(16);
        let task = tokio::spawn(async move {
            // (peer, topic, reply): joins waiting for the peer to subscribe to the topic.
            let mut joining: Vec<(PeerId, String, oneshot::Sender<Result<()>>)> = Vec::new();
            loop {
                tokio::select! {
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::Behaviour(gossipsub::Event::Subscribed { peer_id, topic }) => {
                            let done = joining
                                .extract_if(.., |(p, t, _)| *p == peer_id && t == topic.as_str());
                            for (_, _, reply) in done {
                                let _ = reply.send(Ok(()));
                            }
                        }
                        SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                            for (_, _, reply) in joining.extract_if(.., |(p, _, _)| *p == peer) {
                                let _ = reply.send(Err(anyhow!("dial failed: {error}")));
                            }
                        }
                        _ => {}
                    },
                    command = rx.recv() => match command {
                        None => return,
                        Some(Command::Join(peer, addr, topic, reply)) => {
                            let subscribed = swarm
                                .behaviour_mut()
                                .subscribe(&IdentTopic::new(topic.clone()))
                                .map(|_| ())
                                .map_err(|e| anyhow!("subscribing: {e}"));
                            let dialled = if swarm.is_connected(&peer) {
                                Ok(())
                            } else {
                                swarm
                                    .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build())
                                    .map_err(|e| anyhow!("dial failed: {e}"))
                            };
                            let known = swarm
                                .behaviour()
                                .all_peers()
                                .any(|(p, topics)| *p == peer && topics.iter().any(|t| t.as_str() == topic));
                            match subscribed.and(dialled) {
                                Err(e) => {
                                    let _ = reply.send(Err(e));
                                }
                                Ok(()) if known => {
                                    let _ = reply.send(Ok(()));
                                }
                                Ok(()) => joining.push((peer, topic, reply)),
                            }
                        }
                        Some(Command::Publish(topic, data, reply)) => {
                            let sent = swarm
                                .behaviour_mut()
                                .publish(IdentTopic::new(topic), data)
                                .map(|_| ())
                                .map_err(|e| anyhow!("publishing: {e}"));
                            let _ = reply.send(sent);
                        }
                    },
                }
            }
        });
        Ok(Self { commands, task })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| anyhow!("the peer's swarm task ended"))?;
        tokio::time::timeout(STEP_TIMEOUT, rx)
            .await
            .with_context(|| format!("no answer within {STEP_TIMEOUT:?}"))?
            .context("the peer's swarm task ended")?
    }

    /// Connects to `peer` at `addr` and subscribes to `topic`; returns once `peer` is
    /// known to subscribe to it (within 20 s), so that a publish reaches it.
    pub async fn join(&self, peer: PeerId, addr: Multiaddr, topic: &str) -> Result<()> {
        let topic = topic.to_string();
        self.ask(|r| Command::Join(peer, addr, topic, r))
            .await
            .context("joining the topic")
    }

    /// Publishes `data` as it is (no envelope added) on `topic`.
    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> Result<()> {
        let topic = topic.to_string();
        self.ask(|r| Command::Publish(topic, data, r)).await
    }
}
