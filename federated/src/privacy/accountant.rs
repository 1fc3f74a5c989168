//! Rényi differential privacy accounting for the Poisson-subsampled Gaussian
//! mechanism (Mironov 2017; Mironov, Talwar & Zhang 2019), ported from Google's
//! `dp-accounting` (`rdp_privacy_accountant.py`) so the numbers agree with it:
//! the same default orders, the same series for integer and fractional orders,
//! and the same RDP → (ε, δ) conversion (Canonne, Kamath & Steinke 2020,
//! Proposition 12). `federated/scripts/rdp_reference.py` produced the test
//! vectors below.

/// Why an accounting request is invalid.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AccountantError {
    /// The sampling rate is outside [0, 1].
    #[error("sampling rate {0} is outside [0, 1]")]
    SamplingRate(f64),
    /// The noise multiplier is negative or not finite.
    #[error("noise multiplier {0} must be a non-negative number")]
    NoiseMultiplier(f64),
    /// δ is outside (0, 1).
    #[error("delta {0} must be in (0, 1)")]
    Delta(f64),
    /// An order below 1 was given.
    #[error("RDP order {0} must be at least 1")]
    Order(f64),
}

/// `dp-accounting`'s default orders: 1.1, 1.2, …, 10.9, then 11, …, 63, then
/// 128, 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// Series terms computed for a fractional order before giving up on it (the
/// order is then excluded, as in `dp-accounting`).
const MAX_FRAC_STEPS: usize = 1000;

/// Accumulated RDP at a fixed list of orders.
#[derive(Clone, Debug, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// An accountant with nothing spent, at [`default_orders`].
    pub fn new() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// An accountant at the given orders (each ≥ 1).
    pub fn with_orders(orders: Vec<f64>) -> Result<Self, AccountantError> {
        if let Some(&bad) = orders.iter().find(|&&a| a.is_nan() || a < 1.0) {
            return Err(AccountantError::Order(bad));
        }
        let rdp = vec![0.0; orders.len()];
        Ok(Self { orders, rdp })
    }

    /// Adds `count` runs of the Gaussian mechanism with noise multiplier `z`
    /// on a Poisson sample with rate `q`.
    pub fn compose_poisson_gaussian(
        &mut self,
        q: f64,
        z: f64,
        count: u64,
    ) -> Result<(), AccountantError> {
        let step = poisson_gaussian_rdp(q, z, &self.orders)?;
        for (total, r) in self.rdp.iter_mut().zip(step) {
            *total += r * count as f64;
        }
        Ok(())
    }

    /// The smallest ε (over the orders) for which the composition so far is
    /// (ε, δ)-DP, and the order that achieves it.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64), AccountantError> {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }
}

/// RDP of one Poisson-subsampled Gaussian mechanism at each order.
pub fn poisson_gaussian_rdp(q: f64, z: f64, orders: &[f64]) -> Result<Vec<f64>, AccountantError> {
    if !(0.0..=1.0).contains(&q) {
        return Err(AccountantError::SamplingRate(q));
    }
    if !(z >= 0.0 && z.is_finite()) {
        return Err(AccountantError::NoiseMultiplier(z));
    }
    Ok(orders
        .iter()
        .map(|&alpha| {
            if q == 0.0 {
                0.0
            } else if alpha.is_infinite() || z == 0.0 {
                f64::INFINITY
            } else if q == 1.0 {
                alpha / (2.0 * z * z)
            } else {
                log_a(q, z, alpha) / (alpha - 1.0)
            }
        })
        .collect())
}

/// Converts RDP at `orders` into the best (ε, order) at `delta`.
pub fn epsilon_from_rdp(
    orders: &[f64],
    rdp: &[f64],
    delta: f64,
) -> Result<(f64, f64), AccountantError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountantError::Delta(delta));
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for (&a, &r) in orders.iter().zip(rdp) {
        if a < 1.0 {
            return Err(AccountantError::Order(a));
        }
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

fn log_a(q: f64, sigma: f64, alpha: f64) -> f64 {
    if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    }
}

/// log(A_α) for integer α: a binomial expansion.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    let a = alpha as f64;
    for i in 0..=alpha {
        let i = i as f64;
        let log_coef = log_comb(a, i) + i * q.ln() + (a - i) * log1mq;
        let s = log_coef + (i * i - i) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
    }
    log_a
}

/// log(A_α) for fractional α: the two-sided series of Mironov, Talwar & Zhang
/// (2019, Section 3.3), stopped when both tails are small and shrinking.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let sqrt2 = std::f64::consts::SQRT_2;
    for i in 0..MAX_FRAC_STEPS {
        let i = i as f64;
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * log1mq;
        let log_t1 = log_coef + j * q.ln() + i * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / (sqrt2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (sqrt2 * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// log(exp(x) + exp(y)) without overflow.
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = (x.min(y), x.max(y));
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// log of the binomial coefficient C(n, k) through log|Γ| (n may be fractional).
fn log_comb(n: f64, k: f64) -> f64 {
    ln_gamma(n + 1.0) - ln_gamma(k + 1.0) - ln_gamma(n - k + 1.0)
}

fn ln_gamma(x: f64) -> f64 {
    libm::lgamma_r(x).0
}

/// log(erfc(x)), accurate where erfc underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 20.0 {
        return libm::erfc(x).ln();
    }
    // The asymptotic series erfc(x) ~ exp(−x² − ½x⁻² + ⅝x⁻⁴ …)/(x√π), the
    // same expansion dp-accounting falls back on.
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x * x - 0.5 * x.powi(-2) + 0.625 * x.powi(-4)
        - 37.0 / 24.0 * x.powi(-6)
        + 353.0 / 64.0 * x.powi(-8)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated by federated/scripts/rdp_reference.py with dp-accounting 0.6.0.
    const REFERENCE: &[(f64, f64, u64, f64, f64)] = &[
        // (q, noise_multiplier, rounds, delta, epsilon)
        (1.0, 1.0, 1, 1e-05, 4.728507067217623),
        (1.0, 4.0, 30, 1e-05, 6.813318185854952),
        (1.0, 10.0, 30, 1e-05, 2.3964284685870507),
        (0.5, 1.5, 30, 1e-05, 11.458355953128814),
        (0.1, 1.0, 100, 1e-05, 7.903850223578231),
        (0.1, 0.7, 270, 1e-05, 27.25686182974104),
        (0.1, 1.1, 1000, 1e-05, 22.824272075126245),
        (0.01, 1.1, 10000, 1e-05, 5.632010670081592),
        (0.01, 0.6, 5000, 1e-06, 19.286652671942335),
        (0.2, 2.0, 50, 0.001, 2.7355299858137165),
        (0.05, 0.9, 600, 1e-05, 11.329337431269984),
        (0.003, 4.0, 100, 1e-05, 0.04841514451493989),
    ];

    #[test]
    fn matches_dp_accounting() -> Result<(), AccountantError> {
        for &(q, z, k, delta, want) in REFERENCE {
            let mut acc = RdpAccountant::new();
            acc.compose_poisson_gaussian(q, z, k)?;
            let (got, _) = acc.epsilon(delta)?;
            let rel = (got - want).abs() / want;
            assert!(rel < 1e-3, "q={q} z={z} k={k}: {got} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn default_orders_are_dp_accountings() {
        let o = default_orders();
        assert_eq!(o.len(), 99 + 53 + 4);
        assert_eq!(o[0], 1.1);
        assert_eq!(o[98], 10.9);
        assert_eq!(o[99], 11.0);
        assert_eq!(o[o.len() - 1], 1024.0);
    }

    #[test]
    fn composition_is_additive_and_monotone() -> Result<(), AccountantError> {
        let mut a = RdpAccountant::new();
        a.compose_poisson_gaussian(0.1, 1.0, 50)?;
        a.compose_poisson_gaussian(0.1, 1.0, 50)?;
        let mut b = RdpAccountant::new();
        b.compose_poisson_gaussian(0.1, 1.0, 100)?;
        assert_eq!(a.epsilon(1e-5)?, b.epsilon(1e-5)?);
        let more_noise = {
            let mut c = RdpAccountant::new();
            c.compose_poisson_gaussian(0.1, 2.0, 100)?;
            c.epsilon(1e-5)?.0
        };
        assert!(more_noise < b.epsilon(1e-5)?.0);
        assert_eq!(RdpAccountant::new().epsilon(1e-5)?.0, 0.0);
        Ok(())
    }

    #[test]
    fn invalid_inputs_are_errors() {
        let mut a = RdpAccountant::new();
        assert_eq!(
            a.compose_poisson_gaussian(1.5, 1.0, 1),
            Err(AccountantError::SamplingRate(1.5))
        );
        assert!(a.compose_poisson_gaussian(0.5, f64::NAN, 1).is_err());
        assert_eq!(a.epsilon(0.0), Err(AccountantError::Delta(0.0)));
        assert!(RdpAccountant::with_orders(vec![0.5]).is_err());
    }
}
