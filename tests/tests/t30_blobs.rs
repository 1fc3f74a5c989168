//! Blobs: content-addressed transfer from several providers, corrupted chunks
//! detected and refetched elsewhere, interrupted fetches resumed, bad hashes refused.

use agentmesh_tests::{
    cluster_key_args, ok_stdout, pseudo_random, start_chain, wait_full_mesh, wait_members,
    wait_until, write_file, Node,
};
use anyhow::{Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::{os::unix::fs::FileExt, time::Duration};

const MIB: usize = 1 << 20;

async fn wait_providers(node: &Node, hash: &str, n: usize) -> Result<()> {
    wait_until(
        &format!("{} to find {n} providers", node.name),
        Duration::from_secs(30),
        || async {
            let v = node
                .get_json(&format!("/v1/blobs/{hash}/providers"))
                .await?;
            Ok(v["providers"].as_array().map_or(0, Vec::len) >= n)
        },
    )
    .await
}

fn sha_file(path: &std::path::Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_from_two_providers_survives_one_corrupting_chunks() -> Result<()> {
    let root = tempfile::tempdir()?;
    let nodes = start_chain(root.path(), "b", 3, &[]).await?;
    wait_full_mesh(&nodes, Duration::from_secs(20)).await?;
    let data = pseudo_random(64 * MIB, 7);
    let want = hex::encode(Sha256::digest(&data));
    let file = write_file(root.path(), "in.bin", &data)?;

    let hash = ok_stdout(&nodes[0].cli(&["blob", "put", file.to_str().unwrap()])?)?
        .trim()
        .to_string();
    assert_eq!(hash, want, "blob put prints the SHA-256");

    // Node 1 fetches it and so becomes the second provider...
    let out1 = root.path().join("out1.bin");
    ok_stdout(&nodes[1].cli(&["blob", "get", &hash, out1.to_str().unwrap()])?)?;
    assert_eq!(sha_file(&out1)?, want);

    // ...and then its copy rots: one byte flipped in every chunk.
    let stored = nodes[1].data_dir.join("blobs").join(&hash);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&stored)?;
    for chunk in 0..64u64 {
        let off = chunk * MIB as u64 + 4242;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off)?;
        f.write_all_at(&[b[0] ^ 0xff], off)?;
    }
    drop(f);

    wait_providers(&nodes[2], &hash, 2).await?;
    let out2 = root.path().join("out2.bin");
    let report: Value = serde_json::from_str(&ok_stdout(&nodes[2].cli(&[
        "blob",
        "get",
        &hash,
        out2.to_str().unwrap(),
        "--json",
    ])?)?)?;
    assert_eq!(sha_file(&out2)?, want, "the fetched blob is intact");
    assert_eq!(report["chunks"], 64);
    assert_eq!(
        report["providers"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    assert!(
        report["corrupt_chunks"].as_u64().unwrap_or(0) >= 1,
        "corruption was detected: {report}"
    );
    let bad: Vec<&str> = report["bad_providers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        bad,
        vec![nodes[1].info.peer_id.as_str()],
        "the corrupting provider is named: {report}"
    );

    let metrics = nodes[2]
        .http()
        .get(nodes[2].url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("agentmesh_blob_chunks_corrupt_total"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupted_fetch_resumes_from_verified_chunks() -> Result<()> {
    let root = tempfile::tempdir()?;
    // The provider serves at 8 MiB/s so the fetch is still running when we kill it. Both
    // are members of one cluster (blobs are served to members only).
    let key = cluster_key_args(root.path(), "r")?;
    let mut args = key.clone();
    args.extend(["--blob-serve-bytes-per-sec".into(), (8 * MIB).to_string()]);
    let provider = Node::start(root.path(), "prov", &args).await?;
    let mut boot = key;
    boot.extend(["--bootstrap".to_string(), provider.tcp_addr()]);
    let mut fetcher = Node::start(root.path(), "fetch", &boot).await?;
    wait_members(&[&provider, &fetcher], Duration::from_secs(30)).await?;
    let data = pseudo_random(32 * MIB, 11);
    let file = write_file(root.path(), "in.bin", &data)?;
    let hash = ok_stdout(&provider.cli(&["blob", "put", file.to_str().unwrap()])?)?
        .trim()
        .to_string();
    wait_providers(&fetcher, &hash, 1).await?;

    let url = fetcher.url(&format!("/v1/blobs/{hash}/fetch"));
    let http = fetcher.http().clone();
    let background = tokio::spawn(async move { http.post(url).send().await });
    wait_until("a few verified chunks", Duration::from_secs(30), || async {
        let v = fetcher
            .get_json(&format!("/v1/blobs/{hash}/status"))
            .await?;
        Ok(v["chunks_have"].as_u64().unwrap_or(0) >= 6)
    })
    .await?;
    fetcher.kill().await?;
    let _ = background.await;

    let fetcher = Node::start(root.path(), "fetch", &boot).await?;
    let status = fetcher
        .get_json(&format!("/v1/blobs/{hash}/status"))
        .await?;
    assert_eq!(status["state"], "partial", "{status}");
    wait_providers(&fetcher, &hash, 1).await?;
    let out = root.path().join("out.bin");
    let report: Value = serde_json::from_str(&ok_stdout(&fetcher.cli(&[
        "blob",
        "get",
        &hash,
        out.to_str().unwrap(),
        "--json",
    ])?)?)?;
    let reused = report["chunks_reused"].as_u64().context("chunks_reused")?;
    let fetched = report["chunks_fetched"]
        .as_u64()
        .context("chunks_fetched")?;
    assert!(reused >= 6, "verified chunks were kept: {report}");
    assert_eq!(reused + fetched, 32, "{report}");
    assert_eq!(sha_file(&out)?, hex::encode(Sha256::digest(&data)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_and_malformed_hashes_are_clear_errors() -> Result<()> {
    let root = tempfile::tempdir()?;
    let nodes = start_chain(root.path(), "u", 2, &[]).await?;
    wait_full_mesh(&nodes, Duration::from_secs(20)).await?;
    let unknown = hex::encode(Sha256::digest(b"nobody has this"));
    let out_path = root.path().join("never.bin");
    let out = nodes[0].cli(&["blob", "get", &unknown, out_path.to_str().unwrap()])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no provider found"), "{err}");
    assert!(!out_path.exists(), "nothing is written on failure");

    let out = nodes[0].cli(&["blob", "get", "not-a-hash", "x.bin"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid blob hash"));

    let res = nodes[0]
        .http()
        .get(nodes[0].url("/v1/blobs/zzzz"))
        .send()
        .await?;
    assert_eq!(res.status(), 400);
    let res = nodes[0]
        .http()
        .get(nodes[0].url(&format!("/v1/blobs/{unknown}")))
        .send()
        .await?;
    assert_eq!(res.status(), 404);

    // Small and empty blobs are blobs too.
    let empty = write_file(root.path(), "empty", b"")?;
    let hash = ok_stdout(&nodes[0].cli(&["blob", "put", empty.to_str().unwrap()])?)?
        .trim()
        .to_string();
    assert_eq!(hash, hex::encode(Sha256::digest(b"")));
    wait_providers(&nodes[1], &hash, 1).await?;
    let out = root.path().join("empty.out");
    ok_stdout(&nodes[1].cli(&["blob", "get", &hash, out.to_str().unwrap()])?)?;
    assert_eq!(std::fs::read(out)?.len(), 0);
    Ok(())
}
