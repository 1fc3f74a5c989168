//! `agentmesh job ...` and `agentmesh model get`.

use super::Api;
use crate::cli::SubmitArgs;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::{path::Path, time::Duration};

/// How often `--follow` polls the job.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// The job document a submission sends: --spec's JSON, then each flag given.
pub(crate) fn build_spec(args: &SubmitArgs) -> Result<Value> {
    let mut spec = match &args.spec {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the job spec {}", path.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", path.display()))?;
            if !v.is_object() {
                bail!("{}: a job spec is a JSON object", path.display());
            }
            v
        }
        None => json!({ "model": "softmax", "dataset_features": 64, "classes": 10, "rounds": 10 }),
    };
    let mut set = |key: &str, v: Option<Value>| {
        if let Some(v) = v {
            spec[key] = v;
        }
    };
    set("model", args.model.clone().map(Value::from));
    if !args.hidden.is_empty() {
        set("hidden", Some(json!(args.hidden)));
    }
    set("dataset_features", args.features.map(Value::from));
    set("classes", args.classes.map(Value::from));
    set("rounds", args.rounds.map(Value::from));
    set("local_epochs", args.local_epochs.map(Value::from));
    set("batch_size", args.batch_size.map(Value::from));
    set("learning_rate", args.learning_rate.map(Value::from));
    set("momentum", args.momentum.map(Value::from));
    set("aggregator", args.aggregator.clone().map(Value::from));
    set("byzantine", args.byzantine.map(Value::from));
    set("trim_ratio", args.trim_ratio.map(Value::from));
    set("mixing", args.mixing.clone().map(Value::from));
    set("min_participants", args.min_participants.map(Value::from));
    set(
        "round_timeout_secs",
        args.round_timeout_secs.map(Value::from),
    );
    set("initial_model", args.initial_model.clone().map(Value::from));
    let dp = [args.noise_multiplier, args.delta, args.max_epsilon];
    if args.clip_norm.is_some() || dp.iter().any(Option::is_some) {
        let Some(clip) = args.clip_norm else {
            bail!("--noise-multiplier, --delta and --max-epsilon need --clip-norm");
        };
        let mut p = json!({
            "clip_norm": clip,
            "noise_multiplier": args.noise_multiplier.unwrap_or(0.0),
            "delta": args.delta.unwrap_or(1e-5),
        });
        if let Some(e) = args.max_epsilon {
            p["max_epsilon"] = json!(e);
        }
        spec["privacy"] = p;
    }
    Ok(spec)
}

pub(super) async fn submit(api: &Api, args: &SubmitArgs) -> Result<()> {
    let spec = build_spec(args)?;
    let job = api
        .json(api.request(reqwest::Method::POST, "/v1/jobs").json(&spec))
        .await?;
    let id = job["id"].as_str().unwrap_or_default().to_string();
    if args.follow {
        if !api.json {
            println!("submitted job {id}");
        }
        return status(api, &id, true).await;
    }
    if api.json {
        api.print_json(&job);
    } else {
        println!(
            "submitted job {id}: {} rounds of {} with {}",
            job["rounds"], job["spec"]["model"], job["aggregator"]
        );
        println!("follow it with: agentmesh job status {id} --follow");
        println!("{id}");
    }
    Ok(())
}

async fn fetch(api: &Api, id: &str) -> Result<Value> {
    api.json(api.request(
        reqwest::Method::GET,
        &format!("/v1/jobs/{}", super::urlencode(id)),
    ))
    .await
}

fn fmt_opt(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
}

/// One line about a round: participants, rejections, metrics.
fn round_line(r: &Value) -> String {
    if let Some(failed) = r["failed"].as_str() {
        return format!(
            "round {} attempt {} FAILED: {failed}",
            r["round"], r["attempt"]
        );
    }
    format!(
        "round {:>3}: {} of {} updates used, {} rejected, loss {}, accuracy {}, ε {}, {:.1}s",
        r["round"],
        r["used"],
        r["participants"],
        r["rejected"],
        fmt_opt(&r["loss"], 4),
        r["accuracy"]
            .as_f64()
            .map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
        fmt_opt(&r["epsilon"], 2),
        r["secs"].as_f64().unwrap_or(0.0),
    )
}

pub(super) async fn status(api: &Api, id: &str, follow: bool) -> Result<()> {
    let job = fetch(api, id).await?;
    if !follow {
        if api.json {
            api.print_json(&job);
            return Ok(());
        }
        print_job(&job);
        return Ok(());
    }
    let rounds = job["rounds"].as_u64().unwrap_or(0);
    let bar = (!api.json).then(|| {
        let bar = ProgressBar::new(rounds);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} rounds  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("job {id}"));
        bar
    });
    let mut shown = 0usize;
    let mut last_state = String::new();
    loop {
        let job = fetch(api, id).await?;
        let history = job["history"].as_array().cloned().unwrap_or_default();
        let state = job["state"].as_str().unwrap_or("?").to_string();
        for r in history.iter().skip(shown) {
            match &bar {
                Some(bar) => {
                    bar.println(round_line(r));
                    bar.set_position(job["rounds_done"].as_u64().unwrap_or(0));
                }
                None => println!("{}", json!({ "job_id": id, "round": r })),
            }
        }
        if history.len() != shown || state != last_state {
            if let Some(bar) = &bar {
                let msg = match &job["current"] {
                    Value::Null => state.clone(),
                    c => format!(
                        "round {} open, {} participant(s)",
                        c["round"],
                        c["participants"].as_array().map_or(0, Vec::len)
                    ),
                };
                bar.set_message(msg);
            }
        }
        shown = history.len();
        last_state = state.clone();
        if state != "running" {
            match &bar {
                Some(bar) => {
                    bar.finish_with_message(state.clone());
                    println!(
                        "job {id} {state}{}; model {}",
                        job["message"]
                            .as_str()
                            .map(|m| format!(" ({m})"))
                            .unwrap_or_default(),
                        job["model_hash"].as_str().unwrap_or("-")
                    );
                }
                None => println!("{}", json!({ "job_id": id, "state": state, "job": job })),
            }
            if state == "failed" {
                bail!(
                    "job {id} failed: {}",
                    job["message"].as_str().unwrap_or("no reason recorded")
                );
            }
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

fn print_job(job: &Value) {
    println!("job        {}", job["id"].as_str().unwrap_or("-"));
    println!("state      {}", job["state"].as_str().unwrap_or("-"));
    println!("rounds     {}/{}", job["rounds_done"], job["rounds"]);
    println!("aggregator {}", job["aggregator"].as_str().unwrap_or("-"));
    println!("model      {}", job["model_hash"].as_str().unwrap_or("-"));
    if let Some(m) = job["message"].as_str() {
        println!("message    {m}");
    }
    if let Some(c) = job["current"].as_object() {
        println!(
            "open       round {} attempt {} with {} participant(s)",
            c["round"],
            c["attempt"],
            c["participants"].as_array().map_or(0, Vec::len)
        );
    }
    for r in job["history"].as_array().into_iter().flatten() {
        println!("  {}", round_line(r));
        for x in r["rejected_updates"].as_array().into_iter().flatten() {
            println!(
                "      rejected {}: {}",
                x["node_id"].as_str().unwrap_or("?"),
                x["reason"].as_str().unwrap_or("?")
            );
        }
    }
}

pub(super) async fn list(api: &Api) -> Result<()> {
    let jobs = api
        .json(api.request(reqwest::Method::GET, "/v1/jobs"))
        .await?;
    if api.json {
        api.print_json(&jobs);
        return Ok(());
    }
    println!(
        "{:<18} {:<10} {:<13} {:>7} {:>9}  MODEL",
        "ID", "STATE", "AGGREGATOR", "ROUNDS", "ACCURACY"
    );
    for j in jobs.as_array().into_iter().flatten() {
        println!(
            "{:<18} {:<10} {:<13} {:>7} {:>9}  {}",
            j["id"].as_str().unwrap_or("-"),
            j["state"].as_str().unwrap_or("-"),
            j["aggregator"].as_str().unwrap_or("-"),
            format!("{}/{}", j["rounds_done"], j["rounds"]),
            j["last_round"]["accuracy"]
                .as_f64()
                .map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
            j["model_hash"]
                .as_str()
                .map_or("-", |h| &h[..h.len().min(16)]),
        );
    }
    Ok(())
}

pub(super) async fn cancel(api: &Api, id: &str) -> Result<()> {
    let job = api
        .json(api.request(
            reqwest::Method::POST,
            &format!("/v1/jobs/{}/cancel", super::urlencode(id)),
        ))
        .await?;
    if api.json {
        api.print_json(&job);
    } else {
        println!("job {id} {}", job["state"].as_str().unwrap_or("-"));
    }
    Ok(())
}

pub(super) async fn verify(api: &Api, id: &str, round: Option<u32>) -> Result<()> {
    let mut path = format!("/v1/jobs/{}/verify", super::urlencode(id));
    if let Some(r) = round {
        path.push_str(&format!("?round={r}"));
    }
    let v = api.json(api.request(reqwest::Method::POST, &path)).await?;
    if api.json {
        api.print_json(&v);
    } else {
        for r in v["rounds"].as_array().into_iter().flatten() {
            let verdict = if r["ok"].as_bool() == Some(true) {
                "ok".to_string()
            } else if r["recomputed"].is_null() {
                format!(
                    "NOT RECOMPUTED here: {}",
                    r["error"].as_str().unwrap_or("unknown error")
                )
            } else {
                format!(
                    "MISMATCH (recomputed {}{})",
                    r["recomputed"].as_str().unwrap_or("nothing"),
                    r["error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )
            };
            println!(
                "round {:>3}: {} update(s), model {} {verdict}",
                r["round"],
                r["updates"],
                r["model_hash"].as_str().unwrap_or("-")
            );
        }
    }
    if v["ok"].as_bool() != Some(true) {
        let rounds = v["rounds"].as_array().cloned().unwrap_or_default();
        if rounds
            .iter()
            .any(|r| r["ok"].as_bool() != Some(true) && !r["recomputed"].is_null())
        {
            bail!("job {id}: recomputed rounds do not match the committed models");
        }
        bail!(
            "job {id}: some rounds could not be recomputed on this node (updates are sealed \
             for the voters: verify on a voter)"
        );
    }
    Ok(())
}

pub(super) async fn model_get(api: &Api, key: &str, out: &Path) -> Result<()> {
    let res = api
        .send(api.request(
            reqwest::Method::GET,
            &format!("/v1/models/{}", super::urlencode(key)),
        ))
        .await?;
    let hash = res
        .headers()
        .get("x-model-hash")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = res.bytes().await.context("reading the model")?;
    let got = agentmesh_protocols::blob::BlobHash::of(&bytes).to_string();
    if !hash.is_empty() && got != hash {
        bail!("the model received hashes to {got}, not {hash}");
    }
    let tmp = out.with_extension("part");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    if api.json {
        api.print_json(&json!({ "path": out, "model_hash": got, "size": bytes.len() }));
    } else {
        println!(
            "wrote {} ({} bytes, model {got})",
            out.display(),
            bytes.len()
        );
    }
    Ok(())
}
