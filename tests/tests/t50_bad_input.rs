//! Hostile and malformed input: flags, config, API requests and raw bytes on the
//! wire get clear errors, and the node keeps running.

use agentmesh_tests::{binary, wait_until, Node};
use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::{
    futures::{AsyncReadExt, AsyncWriteExt},
    request_response::{self, ProtocolSupport},
    swarm::SwarmEvent,
    Multiaddr, PeerId, StreamProtocol,
};
use serde_json::Value;
use std::{io, process::Command, time::Duration};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn run(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(binary()?).args(args).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok((out.status.success(), stderr))
}

#[test]
fn malformed_flags_and_config_are_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().context("path")?;
    let (ok, err) = run(&["start", "--data-dir", d, "--bootstrap", "/ip4/nope/tcp/1"])?;
    assert!(!ok);
    assert!(err.contains("invalid bootstrap"), "{err}");
    let (ok, err) = run(&["start", "--data-dir", d, "--listen", "tcp://1.2.3.4"])?;
    assert!(!ok);
    assert!(err.contains("invalid listen"), "{err}");
    let (ok, err) = run(&["start", "--data-dir", d, "--api", "0.0.0.0:7070"])?;
    assert!(!ok);
    assert!(err.contains("--api-key-file"), "{err}");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "listen = 5\n")?;
    let (ok, err) = run(&[
        "start",
        "--config",
        cfg.to_str().context("path")?,
        "--data-dir",
        d,
    ])?;
    assert!(!ok);
    assert!(err.contains("invalid config file"), "{err}");
    // A secret file others can rewrite is refused (and the secret is never printed).
    {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.path().join("shared.key");
        std::fs::write(&key, "a-cluster-secret-of-enough-length\n")?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o666))?;
        let path = key.to_str().context("path")?;
        for flag in ["--cluster-key-file", "--api-key-file"] {
            let (ok, err) = run(&["start", "--data-dir", d, flag, path])?;
            assert!(!ok);
            assert!(err.contains("writable by other users"), "{err}");
            assert!(!err.contains("a-cluster-secret"), "{err}");
        }
    }
    let (ok, err) = run(&["peers", "--api", "127.0.0.1:1"])?;
    assert!(!ok);
    assert!(err.contains("cannot reach the agentmesh API"), "{err}");
    let (ok, _) = run(&["no-such-command"])?;
    assert!(!ok);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn api_off_loopback_requires_the_key() -> Result<()> {
    let root = tempfile::tempdir()?;
    let key_file = root.path().join("admin.key");
    std::fs::write(&key_file, "0123456789abcdef0123456789abcdef\n")?;
    let args = [
        "--api".into(),
        "0.0.0.0:0".into(),
        "--api-key-file".into(),
        key_file.display().to_string(),
    ];
    let node = Node::start(root.path(), "k", &args).await?;
    let port = node.info.api.rsplit(':').next().context("port")?;
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let http = reqwest::Client::new();
    assert_eq!(http.get(url("/v1/status")).send().await?.status(), 401);
    let wrong = http
        .get(url("/v1/status"))
        .bearer_auth("nope")
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    let right = http
        .get(url("/v1/status"))
        .bearer_auth("0123456789abcdef0123456789abcdef")
        .send()
        .await?;
    assert_eq!(right.status(), 200);
    // Probes stay open so orchestrators can use them.
    assert_eq!(http.get(url("/healthz")).send().await?.status(), 200);
    // The CLI passes the key.
    let out = Command::new(binary()?)
        .args(["status", "--json", "--api", &format!("127.0.0.1:{port}")])
        .env("AGENTMESH_API_KEY", "0123456789abcdef0123456789abcdef")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_api_requests_get_4xx_and_the_node_stays_up() -> Result<()> {
    let root = tempfile::tempdir()?;
    let node = Node::start(root.path(), "api", &[]).await?;
    let http = node.http();
    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        (http.post(node.url("/v1/topics/t/messages")), 400),
        (
            http.post(node.url("/v1/topics/t/messages"))
                .body(vec![0u8; 3 << 20]),
            413,
        ),
        (http.get(node.url("/v1/blobs/abc")), 400),
        (
            http.post(node.url(&format!("/v1/blobs/{}/fetch", "0".repeat(64)))),
            404,
        ),
        (http.get(node.url("/v1/nope")), 404),
        (http.get(node.url("/v1/events?topics=a%00b")), 400),
        (http.delete(node.url("/v1/status")), 405),
    ];
    for (req, want) in cases {
        let res = req.send().await?;
        assert_eq!(res.status().as_u16(), want, "{:?}", res.url().path());
    }
    let res = http.get(node.url("/v1/blobs/abc")).send().await?;
    let body: Value = res.json().await?;
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("64 hex digits"),
        "{body}"
    );
    assert_eq!(http.get(node.url("/healthz")).send().await?.status(), 200);
    Ok(())
}

/// A codec that writes raw bytes and reads whatever comes back, for speaking
/// malformed blob-protocol frames to a node.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> io::Result<Vec<u8>> {
        Err(io::Error::other("this client serves nothing"))
    }
    async fn read_response<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        io.take(16 << 20).read_to_end(&mut buf).await?;
        Ok(buf)
    }
    async fn write_request<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }
    async fn write_response<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> io::Result<()> {
        Err(io::Error::other("this client serves nothing"))
    }
}

/// Sends raw bytes on the blob protocol; returns the raw response, or None if
/// the node closed the stream without one.
async fn raw_blob_request(
    swarm: &mut libp2p::Swarm<request_response::Behaviour<RawCodec>>,
    peer: PeerId,
    bytes: Vec<u8>,
) -> Result<Option<Vec<u8>>> {
    let id = swarm.behaviour_mut().send_request(&peer, bytes);
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) if request_id == id => return Some(response),
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    request_id,
                    ..
                }) if request_id == id => return None,
                _ => {}
            }
        }
    };
    Ok(tokio::time::timeout(Duration::from_secs(20), wait)
        .await?
        .filter(|r| !r.is_empty()))
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_wire_is_refused_without_harm() -> Result<()> {
    let root = tempfile::tempdir()?;
    let node = Node::start(root.path(), "wire", &[]).await?;

    // Raw garbage to the TCP and QUIC listeners, below any protocol.
    let tcp_port: u16 = node
        .tcp_addr()
        .split('/')
        .nth(4)
        .context("tcp port")?
        .parse()?;
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port)).await?;
    let _ = sock
        .write_all(&agentmesh_tests::pseudo_random(64 * 1024, 3))
        .await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut sink)).await;
    let quic_port: u16 = node
        .quic_addr()
        .split('/')
        .nth(4)
        .context("quic port")?
        .parse()?;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    for i in 0..100 {
        udp.send_to(
            &agentmesh_tests::pseudo_random(1200, i),
            ("127.0.0.1", quic_port),
        )
        .await?;
    }

    // Malformed frames inside an authenticated libp2p stream.
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            Default::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )?
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(
                    agentmesh_protocols::blob::PROTOCOL,
                    ProtocolSupport::Outbound,
                )],
                request_response::Config::default(),
            )
        })?
        .build();
    let peer: PeerId = node.info.peer_id.parse()?;
    let addr: Multiaddr = node.tcp_addr().parse()?;
    swarm.add_peer_address(peer, addr);

    // A frame announcing 4 GiB: refused from the length prefix alone.
    let resp = raw_blob_request(&mut swarm, peer, u32::MAX.to_be_bytes().to_vec()).await?;
    assert!(
        resp.is_none(),
        "an oversized request got an answer: {resp:?}"
    );
    // A valid request padded past the 1 KiB request limit: only the limit
    // stops the node from answering it.
    let valid = agentmesh_protocols::blob::encode_request(
        &agentmesh_protocols::blob::BlobRequest::manifest(agentmesh_protocols::blob::BlobHash(
            [1; 32],
        )),
    )?;
    let padded_len = agentmesh_protocols::blob::MAX_REQUEST_FRAME + 1;
    let mut padded = (padded_len as u32).to_be_bytes().to_vec();
    padded.extend(&valid);
    padded.resize(4 + padded_len, 0);
    assert!(
        raw_blob_request(&mut swarm, peer, padded).await?.is_none(),
        "oversized request was served"
    );
    // A sane length followed by bytes that are not CBOR.
    let mut garbage = 64u32.to_be_bytes().to_vec();
    garbage.extend(agentmesh_tests::pseudo_random(64, 9));
    assert!(raw_blob_request(&mut swarm, peer, garbage).await?.is_none());
    // A truncated frame.
    assert!(raw_blob_request(&mut swarm, peer, vec![0, 0, 1, 0, 1, 2])
        .await?
        .is_none());
    // A well-formed request for an unknown blob still gets a proper answer.
    let req = agentmesh_protocols::blob::BlobRequest::chunk(
        agentmesh_protocols::blob::BlobHash([7; 32]),
        0,
    );
    let body = agentmesh_protocols::blob::encode_request(&req)?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(body);
    let resp = raw_blob_request(&mut swarm, peer, frame)
        .await?
        .context("no answer to a valid request")?;
    let decoded = agentmesh_protocols::blob::decode_response(&resp)?;
    assert_eq!(
        decoded.body,
        agentmesh_protocols::blob::ResponseBody::NotFound
    );

    wait_until(
        "the node to stay healthy",
        Duration::from_secs(5),
        || async { Ok(node.http().get(node.url("/healthz")).send().await?.status() == 200) },
    )
    .await?;
    // A one-off client with no listen address is not a peer to remember.
    let peers = node.get_json("/v1/peers").await?;
    assert_eq!(peers.as_array().map(Vec::len), Some(0), "{peers}");
    Ok(())
}

/// A peer that is not a member cannot take part in Raft: a vote request in its own name for
/// a far higher term, claiming a longer log, is refused, and the cluster keeps its term.
#[tokio::test(flavor = "multi_thread")]
async fn an_outsider_cannot_drive_raft() -> Result<()> {
    let root = tempfile::tempdir()?;
    // Three members: the node asked does not know the outsider and asks the other two
    // (IsMember) before refusing.
    let nodes = agentmesh_tests::start_cluster(root.path(), "o", 3, &[]).await?;
    let node = &nodes[1];
    let term = |v: &Value| v["term"].as_u64();
    let before = term(&node.get_json("/v1/cluster").await?);

    let mut outsider = agentmesh_tests::raw_raft::RawRaftPeer::new(None)?;
    let me = agentmesh_consensus::node_id_for(&outsider.peer_id().to_string());
    let answer = outsider
        .call(
            node.info.peer_id.parse()?,
            node.tcp_addr().parse()?,
            agentmesh_consensus::hostile_vote_request(1_000_000, me),
        )
        .await?;
    let reason =
        agentmesh_consensus::refusal_reason(&answer).context("the vote request was not refused")?;
    assert!(reason.contains("not a member"), "{reason}");
    let after = node.get_json("/v1/cluster").await?;
    assert_eq!(term(&after), before, "{after}");
    assert!(node.is_ready().await);
    Ok(())
}

/// Garbage on a Raft stream costs only that stream: a length claim past the frame limit
/// closes it unread, and a frame that is no Raft message is refused while the stream stays
/// usable (here for a second request, refused as an outsider's). The node stays ready.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_a_raft_stream_is_refused_without_harm() -> Result<()> {
    use agentmesh_protocols::raft as wire;
    let root = tempfile::tempdir()?;
    let node = Node::start(root.path(), "rs", &[]).await?;
    wait_until(
        "the node to found its cluster",
        Duration::from_secs(20),
        || async { Ok(node.is_ready().await) },
    )
    .await?;
    let peer: PeerId = node.info.peer_id.parse()?;
    let addr: Multiaddr = node.tcp_addr().parse()?;
    let mut outsider = agentmesh_tests::raw_raft::RawRaftPeer::new(None)?;

    let mut stream = outsider.stream(peer, addr.clone()).await?;
    stream.write_all(&u32::MAX.to_be_bytes()).await?;
    stream.flush().await?;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .context("the node kept a stream announcing 4 GiB open")?;
    assert!(
        read.is_err() || rest.is_empty(),
        "an over-limit frame got an answer: {rest:?}"
    );

    let mut stream = outsider.stream(peer, addr).await?;
    let answer = wire::call(&mut stream, b"\xa1\xff not a raft message").await?;
    let reason = agentmesh_consensus::refusal_reason(&answer).context("garbage was not refused")?;
    assert!(!reason.is_empty());
    let me = agentmesh_consensus::node_id_for(&outsider.peer_id().to_string());
    let answer = wire::call(
        &mut stream,
        &agentmesh_consensus::hostile_vote_request(1_000_000, me),
    )
    .await?;
    let reason = agentmesh_consensus::refusal_reason(&answer)
        .context("the vote on a reused stream was not refused")?;
    assert!(reason.contains("not a member"), "{reason}");
    assert!(node.is_ready().await);
    Ok(())
}
