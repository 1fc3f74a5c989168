//! A hand-made libp2p peer that speaks only the Raft protocol, for tests of what nodes do
//! with Raft frames from peers that are not (or no longer honestly) members.

use std::time::Duration;

use agentmesh_protocols::raft as wire;
use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use libp2p::{
    identity::Keypair,
    swarm::{dial_opts::DialOpts, SwarmEvent},
    Multiaddr, PeerId,
};
use tokio::sync::{mpsc, oneshot};

type Dial = (PeerId, Multiaddr, oneshot::Sender<Result<()>>);

/// A peer with `identity` (a fresh one if `None`) that can send Raft frames over TCP. Its
/// swarm runs in a task of its own, ended when the peer is dropped.
pub struct RawRaftPeer {
    peer_id: PeerId,
    control: libp2p_stream::Control,
    dials: mpsc::Sender<Dial>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawRaftPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawRaftPeer {
    /// Builds the peer; it listens nowhere and only dials.
    pub fn new(identity: Option<Keypair>) -> Result<Self> {
        let builder = libp2p::SwarmBuilder::with_existing_identity(
            identity.unwrap_or_else(Keypair::generate_ed25519),
        );
        let mut swarm = builder
            .with_tokio()
            .with_tcp(
                Default::default(),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )?
            .with_behaviour(|_| libp2p_stream::Behaviour::new())?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let peer_id = *swarm.local_peer_id();
        let control = swarm.behaviour().new_control();
        let (dials, mut rx) = mpsc::channel::<Dial>(16);
        let task = tokio::spawn(async move {
            let mut waiting: Vec<(PeerId, oneshot::Sender<Result<()>>)> = Vec::new();
            loop {
                tokio::select! {
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                            for (_, reply) in waiting.extract_if(.., |(p, _)| *p == peer_id) {
                                let _ = reply.send(Ok(()));
                            }
                        }
                        SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                            for (_, reply) in waiting.extract_if(.., |(p, _)| *p == peer) {
                                let _ = reply.send(Err(anyhow!("dial failed: {error}")));
                            }
                        }
                        _ => {}
                    },
                    dial = rx.recv() => {
                        let Some((peer, addr, reply)) = dial else { return };
                        if swarm.is_connected(&peer) {
                            let _ = reply.send(Ok(()));
                        } else {
                            match swarm.dial(DialOpts::peer_id(peer).addresses(vec![addr]).build()) {
                                Ok(()) => waiting.push((peer, reply)),
                                Err(e) => {
                                    let _ = reply.send(Err(anyhow!("dial failed: {e}")));
                                }
                            }
                        }
                    }
                }
            }
        });
        Ok(Self {
            peer_id,
            control,
            dials,
            task,
        })
    }

    /// This peer's id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// A new Raft stream to `peer` at `addr` that the node has taken up (greeted), within
    /// 20 s: raw, for tests that send what no member would.
    pub async fn stream(&mut self, peer: PeerId, addr: Multiaddr) -> Result<libp2p::Stream> {
        tokio::time::timeout(Duration::from_secs(20), async {
            let (tx, rx) = oneshot::channel();
            self.dials
                .send((peer, addr, tx))
                .await
                .map_err(|_| anyhow!("the peer's swarm task ended"))?;
            rx.await.context("the peer's swarm task ended")??;
            let mut stream = self
                .control
                .open_stream(peer, wire::PROTOCOL)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            wire::await_greeting(&mut stream).await?;
            Ok(stream)
        })
        .await
        .context("no raft stream within 20 s")?
    }

    /// Sends `frame` to `peer` at `addr` on a new stream and returns the answer's bytes,
    /// within 20 s.
    pub async fn call(&mut self, peer: PeerId, addr: Multiaddr, frame: Vec<u8>) -> Result<Vec<u8>> {
        let mut stream = self.stream(peer, addr).await?;
        tokio::time::timeout(Duration::from_secs(20), wire::call(&mut stream, &frame))
            .await
            .context("no answer within 20 s")?
            .context("the raft stream failed")
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
