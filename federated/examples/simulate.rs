//! The federated results table on the bundled digits set (`agentmesh simulate --seeds 5`).
//!
//! ```text
//! cargo run --release -p agentmesh-federated --example simulate
//! ```
//! Centralized training, then 10 clients with Dirichlet(0.5) shards for 30 rounds: clean per
//! aggregator, with 2 attackers of each kind per aggregator (on seed 1, then summarised over
//! seeds 1–5), and with differential privacy at several noise levels. Prints Markdown tables;
//! asserts nothing.

use agentmesh_federated::{digits_report, ReportConfig};

fn main() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let report = digits_report(&ReportConfig {
        seeds: 5,
        ..ReportConfig::default()
    })?;
    println!("{}", report.to_markdown());
    eprintln!("(took {:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}
