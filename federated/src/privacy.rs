//! Differential privacy for updates: L2 clipping, Gaussian noise (central or
//! local), the RDP accountant, a budget check, and adaptive clipping.
//!
//! Central DP (DP-FedAvg, McMahan et al. 2018): every update is clipped to
//! norm C, the server averages the n updates and adds N(0, σ²) with
//! σ = z·C/n to the mean. The mean of clipped updates has sensitivity C/n, so
//! each round is a Gaussian mechanism with noise multiplier z, subsampled at
//! the rate clients are sampled. Local DP: each client adds N(0, (z·C)²) to
//! its own clipped update before sending it, so no one has to be trusted with
//! the raw update; it costs √n more noise in the mean for the same ε.
//!
//! The guarantee holds for averaging. Robust aggregators do not have the mean's
//! C/n sensitivity (one update can move a median by more), so ε reported next
//! to them is the FedAvg figure, not a proof.

mod accountant;

pub use accountant::{
    default_orders, epsilon_from_rdp, poisson_gaussian_rdp, AccountantError, RdpAccountant,
};

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// Scales `v` down so its L2 norm is at most `clip_norm`; returns the norm it
/// had before (accumulated in `f64`).
pub fn clip_l2(v: &mut [f32], clip_norm: f64) -> f64 {
    let norm = l2_norm(v);
    if norm > clip_norm && norm > 0.0 {
        let scale = (clip_norm / norm) as f32;
        for x in v.iter_mut() {
            *x *= scale;
        }
    }
    norm
}

/// The L2 norm, accumulated in `f64`.
pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// Adds independent N(0, std²) to every element.
pub fn add_gaussian_noise<R: Rng + ?Sized>(v: &mut [f32], std: f64, rng: &mut R) {
    if std.is_nan() || std <= 0.0 {
        return;
    }
    if let Ok(normal) = Normal::new(0.0, std) {
        for x in v.iter_mut() {
            *x += normal.sample(rng) as f32;
        }
    }
}

/// Where the noise is added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseMode {
    /// The server adds N(0, (zC/n)²) to the mean of the clipped updates.
    #[default]
    Central,
    /// Each client adds N(0, (zC)²) to its clipped update.
    Local,
}

/// Why a privacy configuration is unusable.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    /// A parameter is out of range.
    #[error("privacy config: {field} = {value} {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The accountant refused the parameters.
    #[error(transparent)]
    Accountant(#[from] AccountantError),
}

/// Adaptive clipping (Andrew et al. 2019, "Differentially private learning
/// with adaptive clipping"): the clip norm follows a target quantile γ of the
/// update norms through the geometric update C ← C·exp(−η(b̄ − γ)), where b̄ is
/// the noised fraction of updates whose unclipped norm was at most C.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClipping {
    /// γ: the fraction of updates that should fit under the clip norm.
    pub target_quantile: f64,
    /// η: the geometric learning rate.
    pub learning_rate: f64,
    /// σ_b: std of the noise on the count of unclipped updates (the paper
    /// suggests n/20).
    pub count_noise: f64,
}

impl Default for AdaptiveClipping {
    fn default() -> Self {
        Self {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise: 0.5,
        }
    }
}

impl AdaptiveClipping {
    /// The next clip norm given the pre-clipping norms of this round's updates.
    pub fn next_clip_norm<R: Rng + ?Sized>(
        &self,
        clip_norm: f64,
        norms: &[f64],
        rng: &mut R,
    ) -> f64 {
        if norms.is_empty() {
            return clip_norm;
        }
        let under = norms.iter().filter(|&&n| n <= clip_norm).count() as f64;
        let noise = Normal::new(0.0, self.count_noise.max(0.0))
            .map(|d| d.sample(rng))
            .unwrap_or(0.0);
        let fraction = (under + noise) / norms.len() as f64;
        clip_norm * (-self.learning_rate * (fraction - self.target_quantile)).exp()
    }

    /// The noise multiplier left for the updates when the count query also
    /// spends privacy: z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) (Andrew et al., Theorem 1).
    /// `None` if σ_b is too small for the total z.
    pub fn update_noise_multiplier(&self, z: f64) -> Option<f64> {
        if z == 0.0 {
            return Some(0.0);
        }
        let rest = z.powi(-2) - (2.0 * self.count_noise).powi(-2);
        (rest > 0.0).then(|| rest.powf(-0.5))
    }
}

/// A DP configuration for federated rounds. Deserializes from the training
/// job's `privacy` object (`{clip_norm, noise_multiplier, delta}`; `mode`
/// defaults to central, `adaptive` to off).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// C: the L2 bound every update is clipped to (the starting value when
    /// clipping is adaptive).
    pub clip_norm: f64,
    /// z: noise standard deviation in units of the sensitivity.
    pub noise_multiplier: f64,
    /// δ at which ε is reported.
    pub delta: f64,
    /// Central or local noise.
    #[serde(default)]
    pub mode: NoiseMode,
    /// Adapt the clip norm to a quantile of the update norms.
    #[serde(default)]
    pub adaptive: Option<AdaptiveClipping>,
}

impl DpConfig {
    /// Central DP with fixed clipping.
    pub fn central(clip_norm: f64, noise_multiplier: f64, delta: f64) -> Self {
        Self {
            clip_norm,
            noise_multiplier,
            delta,
            mode: NoiseMode::Central,
            adaptive: None,
        }
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), PrivacyError> {
        let invalid = |field, value, reason| {
            Err(PrivacyError::Invalid {
                field,
                value,
                reason,
            })
        };
        if !(self.clip_norm > 0.0 && self.clip_norm.is_finite()) {
            return invalid("clip_norm", self.clip_norm, "must be positive");
        }
        if !(self.noise_multiplier >= 0.0 && self.noise_multiplier.is_finite()) {
            return invalid("noise_multiplier", self.noise_multiplier, "must be ≥ 0");
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return invalid("delta", self.delta, "must be in (0, 1)");
        }
        if let Some(a) = &self.adaptive {
            if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) {
                return invalid("target_quantile", a.target_quantile, "must be in (0, 1)");
            }
            if a.update_noise_multiplier(self.noise_multiplier).is_none() {
                return invalid(
                    "count_noise",
                    a.count_noise,
                    "is too small: 2·count_noise must exceed noise_multiplier",
                );
            }
        }
        Ok(())
    }

    /// The noise multiplier applied to the updates: z itself, or more when
    /// adaptive clipping's count query takes a share of the budget, so that the
    /// round as a whole still has noise multiplier z.
    pub fn update_noise_multiplier(&self) -> f64 {
        self.adaptive
            .and_then(|a| a.update_noise_multiplier(self.noise_multiplier))
            .unwrap_or(self.noise_multiplier)
    }
}

/// Tracks ε across rounds against a ceiling.
#[derive(Clone, Debug, PartialEq)]
pub struct PrivacyBudget {
    accountant: RdpAccountant,
    sampling_rate: f64,
    noise_multiplier: f64,
    delta: f64,
    max_epsilon: f64,
    rounds: u64,
}

impl PrivacyBudget {
    /// A budget of `max_epsilon` at `delta` for rounds that each sample
    /// clients at `sampling_rate` and add noise with `noise_multiplier`.
    pub fn new(
        sampling_rate: f64,
        noise_multiplier: f64,
        delta: f64,
        max_epsilon: f64,
    ) -> Result<Self, PrivacyError> {
        // Validates the parameters once, up front.
        poisson_gaussian_rdp(sampling_rate, noise_multiplier, &[2.0])?;
        RdpAccountant::new().epsilon(delta)?;
        Ok(Self {
            accountant: RdpAccountant::new(),
            sampling_rate,
            noise_multiplier,
            delta,
            max_epsilon,
            rounds: 0,
        })
    }

    /// ε spent so far.
    pub fn epsilon(&self) -> f64 {
        self.accountant
            .epsilon(self.delta)
            .map_or(f64::INFINITY, |e| e.0)
    }

    /// ε after `more` further rounds.
    pub fn epsilon_after(&self, more: u64) -> f64 {
        let mut next = self.accountant.clone();
        match next.compose_poisson_gaussian(self.sampling_rate, self.noise_multiplier, more) {
            Ok(()) => next.epsilon(self.delta).map_or(f64::INFINITY, |e| e.0),
            Err(_) => f64::INFINITY,
        }
    }

    /// Whether running one more round would take ε above the ceiling.
    pub fn next_round_exceeds(&self) -> bool {
        self.epsilon_after(1) > self.max_epsilon
    }

    /// Records a round as spent.
    pub fn spend_round(&mut self) {
        // Parameters were checked in `new`, so this cannot fail.
        let _ =
            self.accountant
                .compose_poisson_gaussian(self.sampling_rate, self.noise_multiplier, 1);
        self.rounds += 1;
    }

    /// Rounds spent.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn clipping_bounds_the_norm() {
        let mut v = vec![3.0f32, 4.0];
        assert_eq!(clip_l2(&mut v, 1.0), 5.0);
        assert!((l2_norm(&v) - 1.0).abs() < 1e-6);
        let mut small = vec![0.3f32, 0.4];
        clip_l2(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }

    #[test]
    fn noise_is_seeded_with_the_right_scale() {
        let mut a = vec![0.0f32; 20_000];
        let mut b = a.clone();
        add_gaussian_noise(&mut a, 2.0, &mut ChaCha8Rng::seed_from_u64(1));
        add_gaussian_noise(&mut b, 2.0, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(a, b);
        let var = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / a.len() as f64;
        assert!((var.sqrt() - 2.0).abs() < 0.05, "{}", var.sqrt());
    }

    #[test]
    fn budget_stops_before_the_ceiling() -> Result<(), PrivacyError> {
        let mut budget = PrivacyBudget::new(1.0, 4.0, 1e-5, 8.0)?;
        let mut rounds = 0;
        while !budget.next_round_exceeds() {
            budget.spend_round();
            rounds += 1;
        }
        assert!(budget.epsilon() <= 8.0);
        assert!(budget.epsilon_after(1) > 8.0);
        // z = 4, q = 1 reaches ε ≈ 6.8 at 30 rounds (dp-accounting).
        assert!((30..60).contains(&rounds), "{rounds}");
        assert!(PrivacyBudget::new(2.0, 1.0, 1e-5, 1.0).is_err());
        Ok(())
    }

    #[test]
    fn adaptive_clipping_tracks_the_quantile() {
        let cfg = AdaptiveClipping {
            count_noise: 0.0,
            ..AdaptiveClipping::default()
        };
        let norms: Vec<f64> = (1..=100).map(f64::from).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut c = 1.0;
        for _ in 0..200 {
            c = cfg.next_clip_norm(c, &norms, &mut rng);
        }
        assert!((45.0..=56.0).contains(&c), "{c}");
        assert!(cfg.update_noise_multiplier(1.0).is_none());
        let noisy = AdaptiveClipping::default();
        let z = noisy.update_noise_multiplier(0.5).unwrap_or(0.0);
        assert!(z > 0.5);
    }

    #[test]
    fn config_reads_the_job_privacy_object() -> Result<(), serde_json::Error> {
        let cfg: DpConfig = serde_json::from_str(
            r#"{ "clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5 }"#,
        )?;
        assert_eq!(cfg, DpConfig::central(1.0, 1.1, 1e-5));
        assert!(serde_json::from_str::<DpConfig>(r#"{ "clip_norm": 1.0 }"#).is_err());
        Ok(())
    }

    #[test]
    fn config_validation() {
        assert!(DpConfig::central(1.0, 1.0, 1e-5).validate().is_ok());
        assert!(DpConfig::central(0.0, 1.0, 1e-5).validate().is_err());
        assert!(DpConfig::central(1.0, -1.0, 1e-5).validate().is_err());
        assert!(DpConfig::central(1.0, 1.0, 1.0).validate().is_err());
    }
}
