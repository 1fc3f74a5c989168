//! Training in a separate program, over files in a fresh temporary directory.
//!
//! We write into `DIR`: `model.safetensors` (the global model, see
//! `checkpoint`), `data.csv` (the local data, last column the label) and
//! `request.json`:
//!
//! ```json
//! { "protocol": 1, "model": "DIR/model.safetensors", "data": "DIR/data.csv",
//!   "update": "DIR/update.safetensors", "result": "DIR/result.json",
//!   "architecture": {"kind": "mlp", "inputs": 64, "hidden": [64], "classes": 10},
//!   "epochs": 1, "batch_size": 32, "learning_rate": 0.1, "momentum": 0.9, "seed": 7 }
//! ```
//!
//! then run the command with `DIR/request.json` as its last argument (and in
//! `AGENTMESH_TRAIN_REQUEST`). It must write `update.safetensors` (the new
//! parameters minus the global ones, same tensors, metadata `content` =
//! `update`) and `result.json` (`{"examples": N, "loss": L, "accuracy": A}`),
//! then exit 0. Past the timeout it is killed with its process group. A non-zero exit is reported with
//! the end of its stderr; missing or malformed files name the file and problem.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{TrainConfig, TrainError, TrainOutput, Trainer};
use crate::checkpoint::{decode, read_file, Content};
use crate::data::Dataset;
use crate::model::{Architecture, Evaluation, Model};

/// The version written as `protocol` in `request.json`.
pub const EXTERNAL_PROTOCOL_VERSION: u32 = 1;

/// Largest `result.json` read, in bytes.
pub const MAX_RESULT_SIZE: u64 = 64 * 1024;

/// How much of the trainer's stderr a crash report keeps.
const STDERR_TAIL: u64 = 4096;

/// How often the child is polled for exit.
const POLL: Duration = Duration::from_millis(10);

/// Runs a user's program to train; see the module docs for the protocol.
#[derive(Clone, Debug)]
pub struct ExternalTrainer {
    program: String,
    args: Vec<String>,
    timeout: Duration,
}

#[derive(Serialize)]
struct Request<'a> {
    protocol: u32,
    model: PathBuf,
    data: PathBuf,
    update: PathBuf,
    result: PathBuf,
    architecture: &'a Architecture,
    epochs: usize,
    batch_size: usize,
    learning_rate: f32,
    momentum: f32,
    seed: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reply {
    examples: u64,
    loss: f64,
    accuracy: f64,
}

impl ExternalTrainer {
    /// A trainer running `program` with `args` (the request path is appended),
    /// killed after `timeout`.
    pub fn new(program: impl Into<String>, args: Vec<String>, timeout: Duration) -> Self {
        Self {
            program: program.into(),
            args,
            timeout,
        }
    }

    fn run(&self, dir: &Path, request: &Path) -> Result<(), TrainError> {
        let io = |context: &str| {
            let context = context.to_string();
            move |source| TrainError::Io { context, source }
        };
        let stdout = std::fs::File::create(dir.join("stdout.log")).map_err(io("stdout.log"))?;
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).map_err(io("stderr.log"))?;
        let mut command = Command::new(&self.program);
        // Its own process group, so a timeout kills whatever it started too
        // (a data loader's workers, a shell's children), not just the leader.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command
            .args(&self.args)
            .arg(request)
            .env("AGENTMESH_TRAIN_REQUEST", request)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| TrainError::Spawn {
                command: self.program.clone(),
                source,
            })?;
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(io("waiting for the trainer"))? {
                break status;
            }
            if started.elapsed() >= self.timeout {
                // Already exited between the checks is fine; either way reap it.
                kill_tree(&mut child);
                let _ = child.wait();
                return Err(TrainError::Timeout {
                    secs: self.timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(POLL);
        };
        if !status.success() {
            return Err(TrainError::Crashed {
                status: status.to_string(),
                stderr_tail: tail(&stderr_path),
            });
        }
        Ok(())
    }
}

impl Trainer for ExternalTrainer {
    fn train(
        &self,
        global: &Model,
        data: &Dataset,
        config: &TrainConfig,
    ) -> Result<TrainOutput, TrainError> {
        let io = |context: &str| {
            let context = context.to_string();
            move |source| TrainError::Io { context, source }
        };
        let dir = tempfile::Builder::new()
            .prefix("agentmesh-train-")
            .tempdir()
            .map_err(io("creating the work directory"))?;
        let path = |name: &str| dir.path().join(name);
        global
            .save(&path("model.safetensors"))
            .map_err(|e| TrainError::Io {
                context: "writing model.safetensors".to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
        data.write_csv_path(&path("data.csv"))
            .map_err(|e| TrainError::Io {
                context: "writing data.csv".to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let request = Request {
            protocol: EXTERNAL_PROTOCOL_VERSION,
            model: path("model.safetensors"),
            data: path("data.csv"),
            update: path("update.safetensors"),
            result: path("result.json"),
            architecture: global.architecture(),
            epochs: config.epochs,
            batch_size: config.batch_size,
            learning_rate: config.learning_rate,
            momentum: config.momentum,
            seed: config.seed,
        };
        let request_path = path("request.json");
        let json = serde_json::to_vec_pretty(&request).map_err(|e| TrainError::Io {
            context: "encoding request.json".to_string(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&request_path, json).map_err(io("writing request.json"))?;

        self.run(dir.path(), &request_path)?;

        let reply = read_reply(&path("result.json"))?;
        let update_bytes =
            read_file(&path("update.safetensors")).map_err(|e| TrainError::Malformed {
                file: "update.safetensors",
                reason: e.to_string(),
            })?;
        let (architecture, delta, content) =
            decode(&update_bytes).map_err(|e| TrainError::Malformed {
                file: "update.safetensors",
                reason: e.to_string(),
            })?;
        if content != Content::Update {
            return Err(TrainError::Malformed {
                file: "update.safetensors",
                reason: "metadata content is \"model\", expected \"update\"".to_string(),
            });
        }
        if &architecture != global.architecture() {
            return Err(TrainError::Malformed {
                file: "update.safetensors",
                reason: format!(
                    "architecture {architecture:?} differs from the global model's {:?}",
                    global.architecture()
                ),
            });
        }
        Ok(TrainOutput {
            delta,
            examples: reply.examples,
            metrics: Evaluation {
                loss: reply.loss,
                accuracy: reply.accuracy,
            },
        })
    }
}

/// Kills the child's whole process group (Unix), or the child alone.
fn kill_tree(child: &mut std::process::Child) {
    #[cfg(unix)]
    {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        if let Ok(pid) = i32::try_from(child.id()) {
            if killpg(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                return;
            }
        }
    }
    let _ = child.kill();
}

fn read_reply(path: &Path) -> Result<Reply, TrainError> {
    let malformed = |reason: String| TrainError::Malformed {
        file: "result.json",
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| malformed(e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_RESULT_SIZE + 1)
        .read_to_string(&mut text)
        .map_err(|e| malformed(e.to_string()))?;
    if text.len() as u64 > MAX_RESULT_SIZE {
        return Err(malformed(format!("larger than {MAX_RESULT_SIZE} bytes")));
    }
    let reply: Reply = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
    if reply.examples == 0 || !reply.loss.is_finite() || !(0.0..=1.0).contains(&reply.accuracy) {
        return Err(malformed(format!(
            "examples {} must be positive, loss {} finite, accuracy {} in [0, 1]",
            reply.examples, reply.loss, reply.accuracy
        )));
    }
    Ok(reply)
}

/// The last few KiB of a log file, lossily decoded.
fn tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(STDERR_TAIL)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Standardizer;

    fn setup() -> (Model, Dataset) {
        let arch = Architecture::Mlp {
            inputs: 64,
            hidden: vec![16],
            classes: 10,
        };
        let mut data = Dataset::digits()
            .unwrap()
            .subset(&(0..300).collect::<Vec<_>>());
        Standardizer::fit(&data).apply(&mut data).unwrap();
        (Model::new(arch, 3).unwrap(), data)
    }

    fn sh(script: &str, timeout: Duration) -> ExternalTrainer {
        ExternalTrainer::new("sh", vec!["-c".into(), script.into(), "sh".into()], timeout)
    }

    #[test]
    fn crash_reports_exit_code_and_stderr() {
        let (model, data) = setup();
        let t = sh(
            "echo first >&2; echo 'out of memory' >&2; exit 3",
            Duration::from_secs(10),
        );
        let err = t.train(&model, &data, &TrainConfig::default()).unwrap_err();
        match &err {
            TrainError::Crashed {
                status,
                stderr_tail,
            } => {
                assert!(status.contains('3'), "{status}");
                assert!(stderr_tail.ends_with("out of memory"), "{stderr_tail}");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn timeout_kills_the_trainer() {
        let (model, data) = setup();
        let started = Instant::now();
        let err = sh("sleep 30 & sleep 30", Duration::from_millis(300))
            .train(&model, &data, &TrainConfig::default())
            .unwrap_err();
        assert!(matches!(err, TrainError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn malformed_outputs_are_named() {
        let (model, data) = setup();
        let cfg = TrainConfig::default();
        let missing = sh("exit 0", Duration::from_secs(10)).train(&model, &data, &cfg);
        assert!(matches!(
            missing,
            Err(TrainError::Malformed {
                file: "result.json",
                ..
            })
        ));
        // A result but the update is the model file itself (content "model").
        let script = r#"d=$(dirname "$1"); echo '{"examples": 5, "loss": 1.0, "accuracy": 0.5}' > "$d/result.json"; cp "$d/model.safetensors" "$d/update.safetensors""#;
        let wrong = sh(script, Duration::from_secs(10)).train(&model, &data, &cfg);
        assert!(
            matches!(
                wrong,
                Err(TrainError::Malformed {
                    file: "update.safetensors",
                    ..
                })
            ),
            "{wrong:?}"
        );
        let script = r#"d=$(dirname "$1"); echo '{"examples": 5}' > "$d/result.json""#;
        let partial = sh(script, Duration::from_secs(10)).train(&model, &data, &cfg);
        assert!(matches!(
            partial,
            Err(TrainError::Malformed {
                file: "result.json",
                ..
            })
        ));
        let err = ExternalTrainer::new("/nonexistent/trainer", vec![], Duration::from_secs(1))
            .train(&model, &data, &cfg)
            .unwrap_err();
        assert!(matches!(err, TrainError::Spawn { .. }));
    }

    /// The Python example trainer speaks the protocol (skipped without numpy, unless required).
    #[test]
    fn python_example_trainer() -> anyhow::Result<()> {
        let has_numpy = Command::new("python3")
            .args(["-c", "import numpy"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_numpy {
            // CI installs numpy and sets this, so there the example must run.
            anyhow::ensure!(
                std::env::var_os("AGENTMESH_REQUIRE_NUMPY").is_none(),
                "AGENTMESH_REQUIRE_NUMPY is set but python3 cannot import numpy"
            );
            println!("skipped: python3 with numpy is not available");
            return Ok(());
        }
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/python-trainer/train.py"
        );
        let (model, data) = setup();
        let trainer =
            ExternalTrainer::new("python3", vec![script.to_string()], Duration::from_secs(60));
        let config = TrainConfig {
            epochs: 5,
            learning_rate: 0.1,
            momentum: 0.9,
            ..TrainConfig::default()
        };
        let out = trainer.train(&model, &data, &config)?;
        assert_eq!(out.examples, 300);
        let mut trained = model.clone();
        trained.apply_delta(&out.delta)?;
        let before = model.evaluate(&data)?.accuracy;
        let after = trained.evaluate(&data)?.accuracy;
        assert!(after > 0.9 && after > before, "{before} -> {after}");
        // Its own report agrees with ours on the same data.
        assert!(
            (out.metrics.accuracy - after).abs() < 0.02,
            "{:?}",
            out.metrics
        );
        Ok(())
    }
}
