//! The offline tools through the real binary: `dataset split`, `aggregate` and `simulate`.

use agentmesh_federated::{read_npy, write_npy};
use agentmesh_tests::binary;
use anyhow::Result;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Result<Output> {
    Ok(Command::new(binary()?).args(args).output()?)
}

fn json_of(out: &Output) -> Result<Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn npy(dir: &Path, name: &str, values: &[f32]) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, write_npy(&[values.len()], values))?;
    Ok(path.display().to_string())
}

#[test]
fn dataset_split_writes_every_example_once_into_skewed_shards() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("shards");
    let v = json_of(&run(&[
        "dataset",
        "split",
        "--dataset",
        "digits",
        "--nodes",
        "4",
        "--alpha",
        "0.3",
        "--seed",
        "7",
        "--out",
        out.to_str().unwrap_or_default(),
        "--json",
    ])?)?;
    let shards = v["shards"].as_array().cloned().unwrap_or_default();
    assert_eq!(shards.len(), 4);
    let in_shards: u64 = shards.iter().filter_map(|s| s["examples"].as_u64()).sum();
    let test = v["test"]["examples"].as_u64().unwrap_or(0);
    assert_eq!(in_shards + test, 1797, "every digit exactly once");
    for (i, shard) in shards.iter().enumerate() {
        let text = std::fs::read_to_string(out.join(format!("shard-{i}.csv")))?;
        let rows = text.lines().filter(|l| !l.is_empty()).count() as u64;
        assert_eq!(Some(rows), shard["examples"].as_u64());
    }
    // α = 0.3 skews labels: some shard lacks at least one class entirely or nearly.
    let skewed = shards.iter().any(|s| {
        s["class_counts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|n| n.as_u64().unwrap_or(0) <= 2))
    });
    assert!(skewed, "{v}");

    // A ragged CSV is refused with its line.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "1,2,0\n3,4,1\n5,1\n")?;
    let out = run(&[
        "dataset",
        "split",
        "--csv",
        bad.to_str().unwrap_or_default(),
        "--nodes",
        "2",
        "--out",
        dir.path().join("x").to_str().unwrap_or_default(),
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3"), "{err}");
    Ok(())
}

#[test]
fn aggregate_rejects_bad_updates_and_applies_the_rule() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut files = Vec::new();
    for i in 0..5 {
        files.push(npy(d, &format!("u{i}.npy"), &[i as f32; 8])?);
    }
    // One attacker far away, one NaN update, one of the wrong length.
    files.push(npy(d, "far.npy", &[1000.0; 8])?);
    files.push(npy(d, "nan.npy", &[f32::NAN; 8])?);
    files.push(npy(d, "short.npy", &[1.0; 3])?);
    let out_path = d.join("median.npy");
    let mut args = vec!["aggregate", "--method", "median", "--json", "--out"];
    args.push(out_path.to_str().unwrap_or_default());
    args.extend(files.iter().map(String::as_str));
    let v = json_of(&run(&args)?)?;
    assert_eq!(v["accepted"], 6);
    let rejected: Vec<String> = v["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["update"].as_str().map(String::from))
        .collect();
    assert_eq!(rejected.len(), 2, "{v}");
    assert!(rejected.iter().any(|r| r.ends_with("nan.npy")));
    assert!(rejected.iter().any(|r| r.ends_with("short.npy")));
    let (_, median) = read_npy(&std::fs::read(&out_path)?)?;
    // Median of 0,1,2,3,4,1000: the mean of the middle two, 2.5 — the attacker cannot drag it.
    assert!(median.iter().all(|x| (*x - 2.5).abs() < 1e-6), "{median:?}");

    // After nearest-neighbour mixing (f = 1) each honest update is the mean of the five
    // honest ones (2.0) and the far one is mixed toward them, so the median is exactly 2.0.
    let out_path = d.join("nnm.npy");
    let mut args = vec![
        "aggregate",
        "--method",
        "median",
        "--mixing",
        "nnm",
        "-f",
        "1",
    ];
    args.extend(["--json", "--out", out_path.to_str().unwrap_or_default()]);
    args.extend(files[..6].iter().map(String::as_str));
    let v = json_of(&run(&args)?)?;
    assert_eq!(v["mixing"], "nnm", "{v}");
    let (_, mixed) = read_npy(&std::fs::read(&out_path)?)?;
    assert!(mixed.iter().all(|x| (*x - 2.0).abs() < 1e-6), "{mixed:?}");
    // Mixing needs n ≥ 2f + 1, and a known name.
    for (mixing, f, needle) in [("nnm", "3", "at least 7"), ("buckets", "1", "none or nnm")] {
        let mut args = vec![
            "aggregate",
            "--method",
            "median",
            "--mixing",
            mixing,
            "-f",
            f,
        ];
        args.extend(["--out", out_path.to_str().unwrap_or_default()]);
        args.extend(files[..6].iter().map(String::as_str));
        let out = run(&args)?;
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{mixing} f={f}: {stderr}");
    }

    // Krum with f = 1 never picks the far update.
    let out_path = d.join("krum.npy");
    let mut args = vec![
        "aggregate",
        "--method",
        "krum",
        "-f",
        "1",
        "--json",
        "--out",
    ];
    args.push(out_path.to_str().unwrap_or_default());
    args.extend(files[..6].iter().map(String::as_str));
    let v = json_of(&run(&args)?)?;
    let picked = v["selected"][0].as_str().unwrap_or_default().to_string();
    assert!(!picked.ends_with("far.npy"), "{v}");

    // Preconditions are clear errors: Bulyan with f = 2 needs 11 updates.
    let mut args = vec!["aggregate", "--method", "bulyan", "-f", "2", "--out"];
    let bulyan = d.join("b.npy");
    args.push(bulyan.to_str().unwrap_or_default());
    args.extend(files[..5].iter().map(String::as_str));
    let out = run(&args)?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 11"));
    let out = run(&["aggregate", "--method", "mean", "--out", "x.npy", &files[0]])?;
    assert!(!out.status.success());
    Ok(())
}

#[test]
fn simulate_reports_a_robust_rule_surviving_sign_flip_that_fedavg_does_not() -> Result<()> {
    let v = json_of(&run(&[
        "simulate",
        "--clients",
        "6",
        "--attackers",
        "1",
        "--rounds",
        "8",
        "--seeds",
        "2",
        "--no-privacy",
        "--json",
    ])?)?;
    let central = v["centralized"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["model"] == "mlp"))
        .and_then(|r| r["accuracy"].as_f64())
        .unwrap_or(0.0);
    assert!(central > 0.95, "centralized MLP {central}");
    let row = |name: &str| {
        v["robustness"]
            .as_array()
            .and_then(|rows| {
                rows.iter().find(|r| {
                    r["aggregator"]
                        .as_str()
                        .is_some_and(|a| a.starts_with(name))
                })
            })
            .cloned()
            .unwrap_or(Value::Null)
    };
    let under = |r: &Value, attack: &str| {
        r["attacked"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["attack"] == attack))
            .and_then(|x| x["accuracy"].as_f64())
            .unwrap_or(0.0)
    };
    let fedavg = row("FedAvg");
    let multikrum = row("MultiKrum");
    assert!(fedavg["clean"].as_f64().unwrap_or(0.0) > 0.9, "{fedavg}");
    assert!(
        under(&fedavg, "sign_flip") < 0.5,
        "FedAvg should collapse: {fedavg}"
    );
    assert!(
        under(&multikrum, "sign_flip") > 0.9,
        "Multi-Krum should hold: {multikrum}"
    );
    // --seeds 2: every rule summarised over seeds 1 and 2, each attack's worst seed one of them.
    let summary = v["robustness_over_seeds"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Six rules, then trimmed mean and median again after nearest-neighbour mixing.
    assert_eq!(summary.len(), 8, "{summary:?}");
    assert!(
        summary[6..].iter().all(|r| r["aggregator"]
            .as_str()
            .is_some_and(|a| a.ends_with("after NNM { f: 1 }"))),
        "{summary:?}"
    );
    for r in &summary {
        let attacked = r["attacked"].as_array().cloned().unwrap_or_default();
        assert_eq!(attacked.len(), 5, "{r}");
        for a in &attacked {
            assert!(matches!(a["worst_seed"].as_u64(), Some(1 | 2)), "{a}");
            let (worst, mean) = (a["worst_drop"].as_f64(), a["mean_drop"].as_f64());
            assert!(matches!((worst, mean), (Some(w), Some(m)) if w >= m), "{a}");
        }
    }
    let out = run(&["simulate", "--seeds", "0"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seeds"));
    Ok(())
}
