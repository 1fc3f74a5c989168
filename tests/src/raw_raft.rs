//! A hand-made libp2p peer that speaks only the Raft protocol, for tests of what nodes do
//! with Raft frames from peers that are not (or no longer honestly) members.

use std::time::Duration;

use agentmesh_protocols::raft::{self, RaftFrame};
use anyhow::{anyhow, Result};
use futures::StreamExt;
use libp2p::{
    identity::Keypair,
    request_response::{self, ProtocolSupport},
    swarm::SwarmEvent,
    Multiaddr, PeerId, Swarm,
};

/// A peer with `identity` (a fresh one if `None`) that can send Raft frames over TCP.
pub struct RawRaftPeer {
    swarm: Swarm<request_response::Behaviour<raft::RaftCodec>>,
}

impl RawRaftPeer {
    /// Builds the peer; it listens nowhere and only dials.
    pub fn new(identity: Option<Keypair>) -> Result<Self> {
        let behaviour = |_: &Keypair| {
            request_response::Behaviour::with_codec(
                raft::codec(),
                [(raft::PROTOCOL, ProtocolSupport::Outbound)],
                request_response::Config::default(),
            )
        };
        let builder = libp2p::SwarmBuilder::with_existing_identity(
            identity.unwrap_or_else(Keypair::generate_ed25519),
        );
        let swarm = builder
            .with_tokio()
            .with_tcp(
                Default::default(),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )?
            .with_behaviour(behaviour)?
            .build();
        Ok(Self { swarm })
    }

    /// This peer's id.
    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Sends `frame` to `peer` at `addr` and returns the answer's bytes, within 20 s.
    pub async fn call(&mut self, peer: PeerId, addr: Multiaddr, frame: Vec<u8>) -> Result<Vec<u8>> {
        self.swarm.add_peer_address(peer, addr);
        let id = self
            .swarm
            .behaviour_mut()
            .send_request(&peer, RaftFrame(frame));
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::Behaviour(request_response::Event::Message {
                        message:
                            request_response::Message::Response {
                                request_id,
                                response,
                            },
                        ..
                    }) if request_id == id => return Ok(response.0),
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                        request_id,
                        error,
                        ..
                    }) if request_id == id => return Err(anyhow!("{error}")),
                    _ => {}
                }
            }
        })
        .await?
    }

    /// Sends `frame` to whichever of `nodes` leads, as `asked` (a live node) sees it, and
    /// again while there is none or the answer is "not the leader" (a lead may be moving),
    /// for up to 30 s: the last answer.
    pub async fn call_leader(
        &mut self,
        nodes: &[crate::Node],
        asked: &crate::Node,
        frame: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let me = self.peer_id().to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let leader = crate::leader_of(asked).await;
            let node = nodes
                .iter()
                .find(|n| Some(&n.info.peer_id) == leader.as_ref() && n.info.peer_id != me);
            let mut last_err = None;
            if let Some(node) = node {
                let peer = node.info.peer_id.parse()?;
                match self
                    .call(peer, node.tcp_addr().parse()?, frame.clone())
                    .await
                {
                    Ok(answer) => {
                        let moving = agentmesh_consensus::client_error(&answer)
                            .is_some_and(|e| e.contains("not the leader"));
                        if !moving {
                            return Ok(answer);
                        }
                    }
                    // A leader on its way out may not take the connection.
                    Err(e) => last_err = Some(e),
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(last_err.unwrap_or_else(|| anyhow!("no leader answered within 30 s")));
            }
            // Polled, like `wait_until`: a lead moves on the order of an election timeout.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
