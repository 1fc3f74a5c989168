//! Aggregating client updates: FedAvg and the Byzantine-robust rules Krum,
//! Multi-Krum, coordinate-wise trimmed mean and median, and Bulyan, optionally
//! after nearest-neighbour mixing ([`Mixing`]).
//!
//! Updates go through [`validate`] first: wrong-length, non-finite and empty
//! updates are rejected there, with the reason, and only the accepted ones
//! reach an [`Aggregator`] (as [`ValidUpdates`], which nothing else can build).
//! Every aggregator checks its own preconditions (e.g. Krum needs n > 2f + 2)
//! and returns an [`Aggregate`] that says which updates it used, so a round can
//! be audited.

mod coordinate;
mod distance;
mod krum;
mod mean;
mod mixing;
mod parallel;

pub use mixing::{Mixed, Mixing};

use serde::{Deserialize, Serialize};

use coordinate::Statistic;
use distance::Distances;

/// One client's contribution to a round: a parameter delta and the number of
/// examples that produced it (FedAvg's weight).
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    /// The change to the global parameters.
    pub delta: Vec<f32>,
    /// Examples behind the update; must be positive.
    pub examples: u64,
}

impl Update {
    /// An update from a delta and an example count.
    pub fn new(delta: Vec<f32>, examples: u64) -> Self {
        Self { delta, examples }
    }
}

/// Why an update was kept out of aggregation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum RejectReason {
    /// The delta has the wrong number of parameters.
    #[error("expected {expected} parameters, got {found}")]
    WrongLength {
        /// The model's parameter count.
        expected: usize,
        /// The update's length.
        found: usize,
    },
    /// A value is NaN or infinite.
    #[error("parameter {index} is not finite")]
    NotFinite {
        /// The first offending position.
        index: usize,
    },
    /// The update claims zero examples.
    #[error("claims zero examples")]
    NoExamples,
}

/// A rejected update: its position in the input and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Position in the list given to [`validate`].
    pub index: usize,
    /// Why it was rejected.
    pub reason: RejectReason,
}

/// Updates that passed validation: same length, finite, positive example
/// counts. Remembers each one's position in the original list.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidUpdates {
    dim: usize,
    updates: Vec<Update>,
    origin: Vec<usize>,
}

impl ValidUpdates {
    /// Number of accepted updates.
    pub fn len(&self) -> usize {
        self.updates.len()
    }

    /// Whether none were accepted.
    pub fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }

    /// The parameter count every accepted update has.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The accepted updates, in input order.
    pub fn updates(&self) -> &[Update] {
        &self.updates
    }

    /// For each accepted update, its position in the list given to [`validate`].
    pub fn origin(&self) -> &[usize] {
        &self.origin
    }

    fn rows(&self) -> Vec<&[f32]> {
        self.updates.iter().map(|u| u.delta.as_slice()).collect()
    }
}

/// The outcome of [`validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    /// The updates that may be aggregated.
    pub accepted: ValidUpdates,
    /// The ones that may not, and why.
    pub rejected: Vec<Rejection>,
}

/// Splits `updates` into those fit to aggregate (length `dim`, all values
/// finite, positive example count) and the rejected, with reasons.
pub fn validate(updates: Vec<Update>, dim: usize) -> Validated {
    let mut accepted = Vec::with_capacity(updates.len());
    let mut origin = Vec::with_capacity(updates.len());
    let mut rejected = Vec::new();
    for (index, update) in updates.into_iter().enumerate() {
        let reason = if update.delta.len() != dim {
            Some(RejectReason::WrongLength {
                expected: dim,
                found: update.delta.len(),
            })
        } else if let Some(i) = update.delta.iter().position(|v| !v.is_finite()) {
            Some(RejectReason::NotFinite { index: i })
        } else if update.examples == 0 {
            Some(RejectReason::NoExamples)
        } else {
            None
        };
        match reason {
            Some(reason) => rejected.push(Rejection { index, reason }),
            None => {
                accepted.push(update);
                origin.push(index);
            }
        }
    }
    Validated {
        accepted: ValidUpdates {
            dim,
            updates: accepted,
            origin,
        },
        rejected,
    }
}

/// An aggregation rule and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Aggregator {
    /// Mean weighted by example count (McMahan et al. 2017). Not robust: one
    /// update can move it anywhere.
    FedAvg,
    /// The single update with the lowest Krum score: the sum of squared
    /// distances to its n − f − 2 nearest neighbours. Needs n > 2f + 2.
    Krum {
        /// Byzantine updates to tolerate.
        f: usize,
    },
    /// The unweighted mean of the `m` updates with the lowest Krum scores.
    /// Needs n > 2f + 2 and 1 ≤ m ≤ n.
    MultiKrum {
        /// Byzantine updates to tolerate.
        f: usize,
        /// How many to average.
        m: usize,
    },
    /// Per coordinate, drop the ⌊βn⌋ smallest and largest values and average
    /// the rest (Yin et al. 2018). Needs 0 ≤ β < ½ and n − 2⌊βn⌋ ≥ 1.
    TrimmedMean {
        /// Fraction cut from each side.
        beta: f64,
    },
    /// Per coordinate median (the mean of the two middle values for even n).
    Median,
    /// Bulyan (El Mhamdi et al. 2018): select θ = n − 2f updates by repeated
    /// Krum (each round removes the pick from the candidates), then per
    /// coordinate average the β = θ − 2f selected values nearest the median.
    /// Needs n ≥ 4f + 3.
    Bulyan {
        /// Byzantine updates to tolerate.
        f: usize,
    },
}

/// Why an aggregator could not run.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// There is nothing to aggregate.
    #[error("no valid updates to aggregate")]
    NoUpdates,
    /// Too few updates for the number of Byzantine ones to tolerate.
    #[error("{method} with f = {f} needs at least {needed} updates, got {n}")]
    TooFewUpdates {
        /// The aggregator.
        method: &'static str,
        /// Updates available.
        n: usize,
        /// Byzantine updates to tolerate.
        f: usize,
        /// The minimum n.
        needed: usize,
    },
    /// The method name is not one of ours.
    #[error("unknown aggregation method {name:?} (expected fedavg, krum, multikrum, trimmed_mean, median or bulyan)")]
    UnknownMethod {
        /// The name given.
        name: String,
    },
    /// A parameter is out of range.
    #[error("{method}: {reason}")]
    BadParameter {
        /// The aggregator.
        method: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The result of aggregation.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate {
    /// The aggregated delta.
    pub delta: Vec<f32>,
    /// Positions (in the list given to [`validate`]) of the updates the result
    /// was built from: the Krum family's picks in the order chosen; every
    /// accepted update for the other rules. After mixing
    /// ([`Aggregator::aggregate_after`]): every update averaged into those, ascending.
    pub selected: Vec<usize>,
    /// Krum family: each accepted update's score in the first selection round,
    /// as `(position, score)`; empty otherwise. After mixing, the score of the
    /// mixed update at that position.
    pub scores: Vec<(usize, f64)>,
}

impl Aggregator {
    /// Builds a rule from the names and knobs of the command line and the
    /// training job (`fedavg`, `krum`, `multikrum`, `trimmed_mean`, `median`,
    /// `bulyan`; f = `byzantine`, β = `trim_ratio`). Multi-Krum keeps `m`
    /// updates, n − f when not given. Call [`Aggregator::check`] with the
    /// round's n to validate the combination.
    pub fn from_method(
        name: &str,
        f: usize,
        m: Option<usize>,
        beta: f64,
        n: usize,
    ) -> Result<Self, AggregateError> {
        Ok(match name {
            "fedavg" => Self::FedAvg,
            "krum" => Self::Krum { f },
            "multikrum" => Self::MultiKrum {
                f,
                m: m.unwrap_or(n.saturating_sub(f)),
            },
            "trimmed_mean" => Self::TrimmedMean { beta },
            "median" => Self::Median,
            "bulyan" => Self::Bulyan { f },
            other => {
                return Err(AggregateError::UnknownMethod {
                    name: other.to_string(),
                })
            }
        })
    }

    /// The name used in configs and tables.
    pub fn name(&self) -> &'static str {
        match self {
            Self::FedAvg => "fedavg",
            Self::Krum { .. } => "krum",
            Self::MultiKrum { .. } => "multikrum",
            Self::TrimmedMean { .. } => "trimmed_mean",
            Self::Median => "median",
            Self::Bulyan { .. } => "bulyan",
        }
    }

    /// Checks the rule's preconditions for `n` updates.
    pub fn check(&self, n: usize) -> Result<(), AggregateError> {
        if n == 0 {
            return Err(AggregateError::NoUpdates);
        }
        let method = self.name();
        let too_few = |f: usize, needed: usize| {
            if n < needed {
                Err(AggregateError::TooFewUpdates {
                    method,
                    n,
                    f,
                    needed,
                })
            } else {
                Ok(())
            }
        };
        match *self {
            Self::FedAvg | Self::Median => Ok(()),
            Self::Krum { f } => too_few(f, f.saturating_mul(2).saturating_add(3)),
            Self::MultiKrum { f, m } => {
                too_few(f, f.saturating_mul(2).saturating_add(3))?;
                if m == 0 || m > n {
                    return Err(AggregateError::BadParameter {
                        method,
                        reason: format!("m = {m} must be in 1..={n}"),
                    });
                }
                Ok(())
            }
            Self::TrimmedMean { beta } => {
                if !(0.0..0.5).contains(&beta) {
                    return Err(AggregateError::BadParameter {
                        method,
                        reason: format!("beta = {beta} must be in [0, 0.5)"),
                    });
                }
                let cut = trim_count(beta, n);
                if n <= 2 * cut {
                    return Err(AggregateError::BadParameter {
                        method,
                        reason: format!("cutting {cut} from each side of {n} leaves nothing"),
                    });
                }
                Ok(())
            }
            Self::Bulyan { f } => too_few(f, f.saturating_mul(4).saturating_add(3)),
        }
    }

    /// Aggregates validated updates.
    pub fn aggregate(&self, updates: &ValidUpdates) -> Result<Aggregate, AggregateError> {
        let n = updates.len();
        self.check(n)?;
        let rows = updates.rows();
        let origin = updates.origin();
        let everyone = origin.to_vec();
        let out = match *self {
            Self::FedAvg => {
                let total: f64 = updates.updates.iter().map(|u| u.examples as f64).sum();
                let weights: Vec<f64> = updates
                    .updates
                    .iter()
                    .map(|u| u.examples as f64 / total)
                    .collect();
                Aggregate {
                    delta: mean::weighted_mean(&rows, &weights),
                    selected: everyone,
                    scores: Vec::new(),
                }
            }
            Self::Krum { f } => multi_krum(&rows, origin, f, 1),
            Self::MultiKrum { f, m } => multi_krum(&rows, origin, f, m),
            Self::TrimmedMean { beta } => Aggregate {
                delta: coordinate::coordinate_wise(
                    &rows,
                    Statistic::TrimmedMean {
                        cut: trim_count(beta, n),
                    },
                ),
                selected: everyone,
                scores: Vec::new(),
            },
            Self::Median => Aggregate {
                delta: coordinate::coordinate_wise(&rows, Statistic::Median),
                selected: everyone,
                scores: Vec::new(),
            },
            Self::Bulyan { f } => bulyan(&rows, origin, f),
        };
        Ok(out)
    }
}

fn trim_count(beta: f64, n: usize) -> usize {
    (beta * n as f64).floor() as usize
}

fn multi_krum(rows: &[&[f32]], origin: &[usize], f: usize, m: usize) -> Aggregate {
    let distances = Distances::compute(rows);
    let all: Vec<usize> = (0..rows.len()).collect();
    let scores = krum::scores(&distances, &all, f);
    let picked = krum::best(&scores, m);
    let delta = match picked.as_slice() {
        [one] => rows[*one].to_vec(),
        _ => {
            let chosen: Vec<&[f32]> = picked.iter().map(|&i| rows[i]).collect();
            let weights = vec![1.0 / chosen.len() as f64; chosen.len()];
            mean::weighted_mean(&chosen, &weights)
        }
    };
    Aggregate {
        delta,
        selected: picked.iter().map(|&i| origin[i]).collect(),
        scores: origin.iter().copied().zip(scores).collect(),
    }
}

fn bulyan(rows: &[&[f32]], origin: &[usize], f: usize) -> Aggregate {
    let n = rows.len();
    let theta = n - 2 * f;
    let beta = theta - 2 * f;
    let distances = Distances::compute(rows);
    let mut candidates: Vec<usize> = (0..n).collect();
    let mut picked = Vec::with_capacity(theta);
    let mut first_scores = Vec::new();
    while picked.len() < theta {
        let scores = krum::scores(&distances, &candidates, f);
        if first_scores.is_empty() {
            first_scores = origin.iter().copied().zip(scores.iter().copied()).collect();
        }
        let best = krum::best(&scores, 1)[0];
        picked.push(candidates.remove(best));
    }
    let chosen: Vec<&[f32]> = picked.iter().map(|&i| rows[i]).collect();
    Aggregate {
        delta: coordinate::coordinate_wise(&chosen, Statistic::NearestMedian { beta }),
        selected: picked.iter().map(|&i| origin[i]).collect(),
        scores: first_scores,
    }
}

#[cfg(test)]
mod tests;
