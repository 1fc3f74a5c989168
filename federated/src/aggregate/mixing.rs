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
//!
//! Mixing changes how far one update can move the aggregate (an update now enters up to
//! n − f means), so the privacy accounting, which assumes C/n, does not hold after it;
//! jobs refuse the two together.

use super::{distance::Distances, mean, Aggregate, AggregateError, Aggregator, ValidUpdates};
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

    /// The fewest updates the step works on (1 when there is no mixing).
    pub fn min_updates(&self) -> usize {
        match *self {
            Self::None => 1,
            Self::Nnm { f } => f.saturating_mul(2).saturating_add(1),
        }
    }

    /// Checks the step's preconditions for `n` updates.
    pub fn check(&self, n: usize) -> Result<(), AggregateError> {
        match *self {
            Self::None => Ok(()),
            Self::Nnm { f: 0 } => Err(AggregateError::BadParameter {
                method: "nnm",
                reason: "needs f ≥ 1: with f = 0 every update becomes the plain mean".into(),
            }),
            Self::Nnm { f } => {
                let needed = self.min_updates();
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

    /// The mixed updates (same count, order, origins and example counts; for
    /// [`Mixing::None`], the input itself) and which updates went into each.
    pub fn apply<'a>(&self, updates: &'a ValidUpdates) -> Result<Mixed<'a>, AggregateError> {
        if updates.is_empty() {
            return Err(AggregateError::NoUpdates);
        }
        self.check(updates.len())?;
        let Self::Nnm { f } = *self else {
            return Ok(Mixed {
                updates: Cow::Borrowed(updates),
                sources: None,
            });
        };
        let rows = updates.rows();
        let (mixed, neighbours) = nearest_neighbour_means(&rows, rows.len() - f);
        let origin = updates.origin();
        let sources = neighbours
            .into_iter()
            .map(|set| set.into_iter().map(|j| origin[j]).collect())
            .collect();
        let updates = ValidUpdates {
            dim: updates.dim,
            updates: updates
                .updates
                .iter()
                .zip(mixed)
                // A mean of finite values lies between their extremes, so it is finite
                // too: the result is as valid as the input.
                .map(|(u, delta)| super::Update::new(delta, u.examples))
                .collect(),
            origin: origin.to_vec(),
        };
        Ok(Mixed {
            updates: Cow::Owned(updates),
            sources: Some(sources),
        })
    }
}

/// Updates after [`Mixing::apply`].
#[derive(Debug)]
pub struct Mixed<'a> {
    updates: Cow<'a, ValidUpdates>,
    /// Per mixed update (by position), the origins of the updates averaged into it.
    sources: Option<Vec<Vec<usize>>>,
}

impl Mixed<'_> {
    /// The updates the rule is to see.
    pub fn updates(&self) -> &ValidUpdates {
        &self.updates
    }

    /// Origins of the input updates that went into the mixed updates at origins
    /// `selected`, ascending (`selected` itself when nothing was mixed).
    pub fn sources(&self, selected: &[usize]) -> Vec<usize> {
        let Some(sources) = &self.sources else {
            return selected.to_vec();
        };
        let origin = self.updates.origin();
        let mut out: Vec<usize> = selected
            .iter()
            .filter_map(|s| origin.iter().position(|o| o == s))
            .flat_map(|i| sources[i].iter().copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl Aggregator {
    /// Mixes `updates`, then aggregates them; the result's `selected` lists every input
    /// update that went into what the rule used.
    pub fn aggregate_after(
        &self,
        mixing: &Mixing,
        updates: &ValidUpdates,
    ) -> Result<Aggregate, AggregateError> {
        self.check(updates.len())?;
        let mixed = mixing.apply(updates)?;
        let mut out = self.aggregate(mixed.updates())?;
        out.selected = mixed.sources(&out.selected);
        Ok(out)
    }
}

/// For each row, the mean of the `k` rows nearest it (itself included, ties to the lower
/// index), and those rows. Distances are exact squared distances accumulated in `f64`, as
/// for Krum. The chosen rows are averaged in index order, so the mean's bits do not depend
/// on how near each one is, only on which are chosen.
fn nearest_neighbour_means(rows: &[&[f32]], k: usize) -> (Vec<Vec<f32>>, Vec<Vec<usize>>) {
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
            let mut chosen = order[..k].to_vec();
            chosen.sort_unstable();
            let nearest: Vec<&[f32]> = chosen.iter().map(|&j| rows[j]).collect();
            (mean::weighted_mean(&nearest, &weights), chosen)
        })
        .unzip()
}
