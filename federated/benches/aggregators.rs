//! Aggregation benchmark: every aggregator on n updates of d `f32` parameters,
//! next to a plain copy of the same bytes measured in the same run.
//!
//! ```text
//! cargo bench -p agentmesh-federated --bench aggregators -- [--quick] [--only NAME] [--npy-dir DIR]
//! ```
//! `--npy-dir DIR` also writes the n = 30, d = 10⁶ inputs and our outputs as
//! `.npy` for `federated/scripts/flower_baseline.py`. Prints a table; asserts
//! nothing.

use std::hint::black_box;
use std::time::{Duration, Instant};

use agentmesh_federated::{validate, write_npy, Aggregator, Update};
use anyhow::Context;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// The rules at the parameters used for n updates: f = ⌊(n − 3)/4⌋ (the most
/// Bulyan allows), Multi-Krum keeps n − f, trimmed mean cuts 10% per side.
fn aggregators(n: usize) -> Vec<Aggregator> {
    let f = (n - 3) / 4;
    vec![
        Aggregator::FedAvg,
        Aggregator::Krum { f },
        Aggregator::MultiKrum { f, m: n - f },
        Aggregator::TrimmedMean { beta: 0.1 },
        Aggregator::Median,
        Aggregator::Bulyan { f },
    ]
}

/// The benchmark's inputs: update i, coordinate k ~ N(0, 1), from seed 42.
fn inputs(n: usize, d: usize) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    (0..n)
        .map(|_| {
            (0..d)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect::<Vec<f32>>()
        })
        .collect()
}

/// Median and fastest wall time of `reps` runs (after one warm-up). On a
/// shared machine the fastest run is the one least disturbed by others.
fn time(reps: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    f();
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    (times[times.len() / 2], times[0])
}

/// CPU time of the whole process (all threads, live or joined) in ms, from
/// `/proc/self/stat` (Linux; 10 ms ticks). On a shared machine, CPU time per
/// run divided by the thread count estimates the wall time on an idle one.
fn cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 10.0)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let npy_dir = args
        .iter()
        .position(|a| a == "--npy-dir")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from);
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let ns: &[usize] = if quick { &[30] } else { &[10, 30, 100] };
    let ds: &[usize] = if quick {
        &[1_000_000]
    } else {
        &[100_000, 1_000_000]
    };
    println!(
        "threads: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| n | d | memcpy n·d·4 B, median / best (ms) | aggregator | median / best (ms) | × memcpy (best) | CPU ms per run | selected |");
    println!("|---|---|---|---|---|---|---|---|");
    for &n in ns {
        for &d in ds {
            let rows = inputs(n, d);
            let updates: Vec<Update> = rows.iter().map(|r| Update::new(r.clone(), 1)).collect();
            let valid = validate(updates, d).accepted;
            let reps = if n * d >= 50_000_000 { 7 } else { 15 };
            // The baseline: copy the same n·d floats once into a reused buffer.
            let mut sink = vec![0.0f32; n * d];
            let copy = time(reps, || {
                for (i, r) in rows.iter().enumerate() {
                    sink[i * d..(i + 1) * d].copy_from_slice(r);
                }
                black_box(&sink);
            });
            drop(sink);
            for agg in aggregators(n) {
                if only.as_deref().is_some_and(|o| o != agg.name()) {
                    continue;
                }
                let mut out = None;
                let cpu_before = cpu_ms();
                let t = time(reps, || {
                    out = Some(black_box(agg.aggregate(&valid)));
                });
                let cpu = match (cpu_before, cpu_ms()) {
                    (Some(a), Some(b)) => format!("{:.0}", (b - a) / (reps + 1) as f64),
                    _ => String::from("-"),
                };
                let out = out.context("no run")??;
                let selected = match agg {
                    Aggregator::Krum { .. }
                    | Aggregator::MultiKrum { .. }
                    | Aggregator::Bulyan { .. } => format!("{} of {n}", out.selected.len()),
                    _ => String::from("all"),
                };
                println!(
                    "| {n} | {d} | {} / {} | {agg:?} | {} / {} | {:.1} | {cpu} | {selected} |",
                    ms(copy.0),
                    ms(copy.1),
                    ms(t.0),
                    ms(t.1),
                    t.1.as_secs_f64() / copy.1.as_secs_f64()
                );
                if let (Some(dir), 30, 1_000_000) = (&npy_dir, n, d) {
                    std::fs::create_dir_all(dir)?;
                    let path = dir.join(format!("ours_{}.npy", agg.name()));
                    std::fs::write(&path, write_npy(&[d], &out.delta))?;
                    if matches!(agg, Aggregator::Krum { .. } | Aggregator::Bulyan { .. }) {
                        let sel = out.selected.iter().map(|&i| i as f32).collect::<Vec<_>>();
                        let path = dir.join(format!("ours_{}_selected.npy", agg.name()));
                        std::fs::write(path, write_npy(&[sel.len()], &sel))?;
                    }
                }
            }
            if let (Some(dir), 30, 1_000_000) = (&npy_dir, n, d) {
                let flat: Vec<f32> = rows.concat();
                std::fs::write(dir.join("updates.npy"), write_npy(&[n, d], &flat))?;
            }
        }
    }
    Ok(())
}
