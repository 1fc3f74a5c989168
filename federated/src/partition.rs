//! Sharding a dataset across clients: IID, or non-IID by label with the usual
//! per-class Dirichlet(α) partition; and writing shards for `dataset split`.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use crate::data::{DataError, Dataset};

/// How many times a Dirichlet partition is redrawn to give every client at least
/// `min_size` examples before giving up.
const MAX_DIRICHLET_DRAWS: usize = 1000;

/// How examples are dealt to clients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partition {
    /// Shuffle and deal round-robin: every shard looks like the whole.
    Iid,
    /// For each class, draw client proportions p ~ Dirichlet(α, …, α) and hand
    /// that class's examples out in those proportions (Hsu et al. 2019). Small α
    /// gives each client few classes; large α approaches IID. The draw is repeated
    /// until every client has at least `min_size` examples.
    Dirichlet {
        /// Concentration α > 0.
        alpha: f64,
        /// Smallest acceptable shard.
        min_size: usize,
    },
}

impl Partition {
    /// A Dirichlet partition with the customary minimum shard size of 10.
    pub fn dirichlet(alpha: f64) -> Self {
        Self::Dirichlet {
            alpha,
            min_size: 10,
        }
    }
}

/// Splits `data` into `clients` shards. Deterministic for a given seed.
pub fn partition(
    data: &Dataset,
    clients: usize,
    how: Partition,
    seed: u64,
) -> Result<Vec<Dataset>, DataError> {
    if clients == 0 || clients > data.len() {
        return Err(DataError::InvalidSplit {
            reason: format!("cannot deal {} examples to {clients} clients", data.len()),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let assignment = match how {
        Partition::Iid => {
            let mut order: Vec<usize> = (0..data.len()).collect();
            order.shuffle(&mut rng);
            let mut shards = vec![Vec::new(); clients];
            for (k, i) in order.into_iter().enumerate() {
                shards[k % clients].push(i);
            }
            shards
        }
        Partition::Dirichlet { alpha, min_size } => {
            dirichlet(data, clients, alpha, min_size, &mut rng)?
        }
    };
    Ok(assignment.iter().map(|idx| data.subset(idx)).collect())
}

fn dirichlet(
    data: &Dataset,
    clients: usize,
    alpha: f64,
    min_size: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, DataError> {
    let invalid = |reason: String| DataError::InvalidSplit { reason };
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(invalid(format!("Dirichlet alpha {alpha} must be positive")));
    }
    if clients.saturating_mul(min_size) > data.len() {
        return Err(invalid(format!(
            "{} examples cannot give {clients} clients {min_size} each",
            data.len()
        )));
    }
    let gamma = Gamma::new(alpha, 1.0).map_err(|e| invalid(e.to_string()))?;
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); data.classes()];
    for (i, &l) in data.labels().iter().enumerate() {
        by_class[l].push(i);
    }
    for _ in 0..MAX_DIRICHLET_DRAWS {
        let mut shards = vec![Vec::new(); clients];
        for members in &by_class {
            let mut members = members.clone();
            members.shuffle(rng);
            // Dirichlet(α·1) as normalised Gamma(α, 1) draws; a draw that
            // underflows to all zeros (tiny α) is redrawn.
            let mut p: Vec<f64> = (0..clients).map(|_| gamma.sample(rng)).collect();
            let mut total: f64 = p.iter().sum();
            while total <= 0.0 {
                p = (0..clients).map(|_| gamma.sample(rng)).collect();
                total = p.iter().sum();
            }
            let mut start = 0usize;
            let mut cumulative = 0.0;
            for (client, share) in p.iter().enumerate() {
                cumulative += share / total;
                let end = if client + 1 == clients {
                    members.len()
                } else {
                    ((cumulative * members.len() as f64).round() as usize).min(members.len())
                };
                shards[client].extend_from_slice(&members[start..end.max(start)]);
                start = end.max(start);
            }
        }
        if shards.iter().all(|s| s.len() >= min_size) {
            for s in &mut shards {
                s.shuffle(rng);
            }
            return Ok(shards);
        }
    }
    Err(invalid(format!(
        "no Dirichlet({alpha}) draw in {MAX_DIRICHLET_DRAWS} gave every client {min_size} examples"
    )))
}

/// Writes `DIR/shard-0.csv … DIR/shard-{N-1}.csv` and `DIR/test.csv`, creating
/// `dir` if needed; returns the paths written, shards first.
pub fn write_shards(
    dir: &Path,
    shards: &[Dataset],
    test: &Dataset,
) -> Result<Vec<PathBuf>, DataError> {
    std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut written = Vec::with_capacity(shards.len() + 1);
    for (i, shard) in shards.iter().enumerate() {
        let path = dir.join(format!("shard-{i}.csv"));
        shard.write_csv_path(&path)?;
        written.push(path);
    }
    let path = dir.join("test.csv");
    test.write_csv_path(&path)?;
    written.push(path);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iid_shards_cover_everything_once() -> anyhow::Result<()> {
        let d = Dataset::digits()?;
        let shards = partition(&d, 7, Partition::Iid, 3)?;
        assert_eq!(shards.iter().map(Dataset::len).sum::<usize>(), d.len());
        let sizes: Vec<usize> = shards.iter().map(Dataset::len).collect();
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        Ok(())
    }

    #[test]
    fn dirichlet_is_skewed_complete_and_seeded() -> anyhow::Result<()> {
        let d = Dataset::digits()?;
        let shards = partition(&d, 10, Partition::dirichlet(0.5), 11)?;
        assert_eq!(shards.iter().map(Dataset::len).sum::<usize>(), d.len());
        assert!(shards.iter().all(|s| s.len() >= 10));
        let mut total = vec![0; 10];
        for s in &shards {
            for (t, c) in total.iter_mut().zip(s.class_counts()) {
                *t += c;
            }
        }
        assert_eq!(total, d.class_counts());
        // With α = 0.5 some client lacks some class entirely; IID would not.
        assert!(shards.iter().any(|s| s.class_counts().contains(&0)));
        assert_eq!(partition(&d, 10, Partition::dirichlet(0.5), 11)?, shards);
        Ok(())
    }

    #[test]
    fn impossible_partitions_are_errors() -> anyhow::Result<()> {
        let d = Dataset::digits()?.subset(&(0..50).collect::<Vec<_>>());
        assert!(partition(&d, 0, Partition::Iid, 0).is_err());
        assert!(partition(&d, 51, Partition::Iid, 0).is_err());
        assert!(partition(&d, 6, Partition::dirichlet(0.5), 0).is_err());
        assert!(partition(&d, 2, Partition::dirichlet(0.0), 0).is_err());
        Ok(())
    }

    #[test]
    fn writes_shards_and_test() -> anyhow::Result<()> {
        let d = Dataset::digits()?;
        let (train, test) = d.split(0.2, 0)?;
        let shards = partition(&train, 3, Partition::Iid, 0)?;
        let dir = tempfile::tempdir()?;
        let paths = write_shards(dir.path(), &shards, &test)?;
        assert_eq!(paths.len(), 4);
        assert!(paths[3].ends_with("test.csv"));
        let back = Dataset::from_csv_path(&paths[1], Some(10))?;
        assert_eq!(back, shards[1]);
        Ok(())
    }
}
