//! Byzantine update generators, for testing aggregators and simulating
//! attacked rounds. The attacker is omniscient where the attack needs it (ALIE
//! and inner-product manipulation read the honest updates of the round), as in
//! the papers that define them.

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// An attack and its strength.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Attack {
    /// Send −scale × the update honest training produced.
    SignFlip {
        /// How far to push the other way (1 = plain sign flip).
        scale: f32,
    },
    /// Send factor × the honest update (a boosted update).
    Scaled {
        /// The multiplier.
        factor: f32,
    },
    /// Send N(0, std²) noise in every coordinate.
    GaussianNoise {
        /// The noise standard deviation.
        std: f64,
    },
    /// "A Little Is Enough" (Baruch et al. 2019): per coordinate μ − z·σ of the
    /// honest updates, with z = z_max from the paper: s = ⌊n/2 + 1⌋ − f,
    /// z_max = Φ⁻¹((n − s)/n). Small enough to pass distance-based filters,
    /// consistent enough across attackers to bias the mean.
    Alie,
    /// Inner-product manipulation (Xie et al. 2019): send −ε × the mean of the
    /// honest updates, so the aggregate's inner product with the true
    /// direction turns negative.
    InnerProduct {
        /// ε.
        epsilon: f32,
    },
}

impl Attack {
    /// Short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SignFlip { .. } => "sign_flip",
            Self::Scaled { .. } => "scaled",
            Self::GaussianNoise { .. } => "gaussian",
            Self::Alie => "alie",
            Self::InnerProduct { .. } => "ipm",
        }
    }

    /// The update one attacker sends. `own` is what honest training on the
    /// attacker's data produced; `honest` are the honest updates of the round
    /// (all the same length as `own`); `total` and `byzantine` are n and f.
    pub fn corrupt<R: Rng + ?Sized>(
        &self,
        own: &[f32],
        honest: &[&[f32]],
        total: usize,
        byzantine: usize,
        rng: &mut R,
    ) -> Vec<f32> {
        match *self {
            Self::SignFlip { scale } => own.iter().map(|&v| -scale * v).collect(),
            Self::Scaled { factor } => own.iter().map(|&v| factor * v).collect(),
            Self::GaussianNoise { std } => match Normal::new(0.0, std.max(0.0)) {
                Ok(normal) => own.iter().map(|_| normal.sample(rng) as f32).collect(),
                Err(_) => vec![0.0; own.len()],
            },
            Self::Alie => {
                let z = alie_z_max(total, byzantine);
                let (mean, std) = mean_and_std(honest, own.len());
                mean.iter()
                    .zip(&std)
                    .map(|(&m, &s)| (m - z * s) as f32)
                    .collect()
            }
            Self::InnerProduct { epsilon } => {
                let (mean, _) = mean_and_std(honest, own.len());
                mean.iter().map(|&m| -epsilon * m as f32).collect()
            }
        }
    }
}

/// ALIE's z_max for n workers of which f are Byzantine: the number of honest
/// workers the attackers need on their side is s = ⌊n/2 + 1⌋ − f, and z_max =
/// Φ⁻¹((n − s)/n) keeps the attack within the spread of that many.
pub fn alie_z_max(n: usize, f: usize) -> f64 {
    let n_f = n as f64;
    let s = ((n_f / 2.0 + 1.0).floor() - f as f64).max(0.0);
    inverse_normal_cdf(((n_f - s) / n_f).clamp(1e-12, 1.0 - 1e-12))
}

/// Φ⁻¹(p) by bisection on Φ(x) = ½·erfc(−x/√2); exact to f64 precision and
/// only called once per round.
fn inverse_normal_cdf(p: f64) -> f64 {
    let cdf = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
    let (mut lo, mut hi) = (-40.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if cdf(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Per-coordinate mean and (population) standard deviation, in `f64`.
fn mean_and_std(rows: &[&[f32]], dim: usize) -> (Vec<f64>, Vec<f64>) {
    let n = rows.len().max(1) as f64;
    let mut mean = vec![0.0f64; dim];
    for r in rows {
        for (m, &v) in mean.iter_mut().zip(r.iter()) {
            *m += f64::from(v) / n;
        }
    }
    let mut var = vec![0.0f64; dim];
    for r in rows {
        for ((s, &m), &v) in var.iter_mut().zip(&mean).zip(r.iter()) {
            *s += (f64::from(v) - m).powi(2) / n;
        }
    }
    (mean, var.into_iter().map(f64::sqrt).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn z_max_follows_the_paper() {
        // n = 50, f = 12 (the paper's CIFAR setting): s = 26 − 12 = 14,
        // z = Φ⁻¹(36/50) ≈ 0.58.
        assert!((alie_z_max(50, 12) - 0.5828).abs() < 1e-3);
        // n = 10, f = 2: s = 4, z = Φ⁻¹(0.6) ≈ 0.2533.
        assert!((alie_z_max(10, 2) - 0.2533).abs() < 1e-3);
        assert!(inverse_normal_cdf(0.5).abs() < 1e-12);
        assert!((inverse_normal_cdf(0.975) - 1.959964).abs() < 1e-5);
    }

    #[test]
    fn attacks_do_what_they_say() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let h1 = [1.0f32, 2.0];
        let h2 = [3.0f32, 2.0];
        let honest: [&[f32]; 2] = [&h1, &h2];
        let own = [1.0f32, -1.0];
        let flip = Attack::SignFlip { scale: 2.0 }.corrupt(&own, &honest, 4, 2, &mut rng);
        assert_eq!(flip, vec![-2.0, 2.0]);
        let scaled = Attack::Scaled { factor: 3.0 }.corrupt(&own, &honest, 4, 2, &mut rng);
        assert_eq!(scaled, vec![3.0, -3.0]);
        let ipm = Attack::InnerProduct { epsilon: 0.5 }.corrupt(&own, &honest, 4, 2, &mut rng);
        assert_eq!(ipm, vec![-1.0, -1.0]);
        let alie = Attack::Alie.corrupt(&own, &honest, 4, 2, &mut rng);
        let z = alie_z_max(4, 2) as f32;
        assert!((alie[0] - (2.0 - z)).abs() < 1e-6);
        assert_eq!(alie[1], 2.0);
        let noise = Attack::GaussianNoise { std: 1.0 }.corrupt(&own, &honest, 4, 2, &mut rng);
        assert_eq!(noise.len(), 2);
    }
}
