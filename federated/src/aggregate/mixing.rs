//! Mixing: a step run on the updates before the aggregation rule.
//!
//! Nearest-neighbour mixing (NNM; Allouah et al., "Fixing by Mixing", AISTATS 2023)
//! replaces every update by the mean of the n − f updates nearest it, itself included.
//! Honest updates then move toward each other, which shrinks the spread that
//! heterogeneous (non-IID) data gives them, while a Byzantine update far from the
//! honest ones ends up mixed only with Byzantine or nearby updates. Coordinate-wise rules
//! (median, trimmed mean) lose much less to attacks on non-IID data after it; the paper
//! proves the same for Krum and the others. It costs the pairwise distances (as Krum does)
//! and n means of n − f updates.

use super::{distance::Distances, mean, AggregateError, ValidUpdates};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// What is done to the updates before the rule sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mixing {
    /// The rule sees the updates as sent.
    #[default]
    None,
    /// Nearest-neighbour mixing: each update becomes the unweighted mean of the n − f
    /// updates nearest it (squared Euclidean distance, itself included; ties go to the
    /// earlier update). Needs n ≥ 2f + 1.
    Nnm {
        /// Byzantine updates to tolerate.
        f: usize,
    },
}

impl Mixing {
    /// Builds the step from its name (`none` or `nnm`) and f.
    pub fn from_name(name: &str, f: usize) -> Result<Self, AggregateError> {
        match name {
            "none" => Ok(Self::None),
            "nnm" => Ok(Self::Nnm { f }),
            other => Err(AggregateError::BadParameter {
                method: "mixing",
                reason: format!("unknown mixing {other:?} (expected none or nnm)"),
            }),
        }
    }

    /// The name used in configs and tables.
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Nnm { .. } => "nnm",
        }
    }

    /// Checks the step's preconditions for `n` updates.
    pub fn check(&self, n: usize) -> Result<(), AggregateError> {
        match *self {
            Self::None => Ok(()),
            Self::Nnm { f } => {
                let needed = f.saturating_mul(2).saturating_add(1);
                if n < needed {
                    return Err(AggregateError::TooFewUpdates {
                        method: "nnm",
                        n,
                        f,
                        needed,
                    });
                }
                Ok(())
            }
        }
    }

    /// The mixed updates: same count, order, origins and example counts; for
    /// [`Mixing::None`], the input itself.
    pub fn apply<'a>(
        &self,
        updates: &'a ValidUpdates,
    ) -> Result<Cow<'a, ValidUpdates>, AggregateError> {
        if updates.is_empty() {
            return Err(AggregateError::NoUpdates);
        }
        self.check(updates.len())?;
        let Self::Nnm { f } = *self else {
            return Ok(Cow::Borrowed(updates));
        };
        let rows = updates.rows();
        let mixed = nearest_neighbour_means(&rows, rows.len() - f);
        let mut out = updates.clone();
        for (u, delta) in out.updates.iter_mut().zip(mixed) {
            // A mean of finite values lies between their extremes, so it is finite too:
            // the result is as valid as the input.
            u.delta = delta;
        }
        Ok(Cow::Owned(out))
    }
}

/// For each row, the mean of the `k` rows nearest it (itself included, ties to the lower
/// index). Distances are exact squared distances accumulated in `f64`, as for Krum.
fn nearest_neighbour_means(rows: &[&[f32]], k: usize) -> Vec<Vec<f32>> {
    let n = rows.len();
    let distances = Distances::compute(rows);
    let weights = vec![1.0 / k as f64; k];
    (0..n)
        .map(|i| {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| {
                distances
                    .get(i, a)
                    .total_cmp(&distances.get(i, b))
                    .then(a.cmp(&b))
            });
            let nearest: Vec<&[f32]> = order[..k].iter().map(|&j| rows[j]).collect();
            mean::weighted_mean(&nearest, &weights)
        })
        .collect()
}
