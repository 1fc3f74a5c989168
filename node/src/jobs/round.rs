//! Turning a round's valid updates into the next global model. Deterministic: the aggregating
//! leader and an auditor running `job verify` get the same bytes from the same inputs (updates in
//! node-id order, the committed noise seed).

use super::spec::JobSpec;
use agentmesh_federated::{add_gaussian_noise, clip_l2, validate, Model, PrivacyBudget, Update};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// The new model and which of the given updates the rule built it from (positions).
pub(super) struct RoundOutcome {
    /// Next global model.
    pub(super) model: Model,
    /// Positions of the updates used (Krum's picks; all for the averaging rules).
    pub(super) selected: Vec<usize>,
}

/// Aggregates `updates` (in the order given, which must be node-id order) onto `base`.
pub(super) fn aggregate(
    spec: &JobSpec,
    base: &Model,
    updates: &[(Vec<f32>, u64)],
    noise_seed: Option<[u8; 32]>,
) -> Result<RoundOutcome, String> {
    let mut list = Vec::with_capacity(updates.len());
    for (delta, examples) in updates {
        let mut delta = delta.clone();
        if let Some(p) = &spec.privacy {
            // The sender should have clipped; clip again so one update's influence stays
            // bounded whatever it sent.
            clip_l2(&mut delta, p.clip_norm);
        }
        list.push(Update::new(delta, *examples));
    }
    let checked = validate(list, base.params().len());
    if let Some(r) = checked.rejected.first() {
        return Err(format!("update {} is invalid: {}", r.index, r.reason));
    }
    let n = checked.accepted.len();
    let rule = spec.aggregator(n)?;
    rule.check(n).map_err(|e| format!("aggregator: {e}"))?;
    let mixing = spec.mixing()?;
    mixing.check(n).map_err(|e| format!("mixing: {e}"))?;
    let mut agg = rule
        .aggregate_after(&mixing, &checked.accepted)
        .map_err(|e| format!("aggregator: {e}"))?;
    if let (Some(std), Some(seed)) = (spec.central_noise_std(n), noise_seed) {
        let mut rng = ChaCha20Rng::from_seed(seed);
        add_gaussian_noise(&mut agg.delta, std, &mut rng);
    }
    let mut model = base.clone();
    model
        .apply_delta(&agg.delta)
        .map_err(|e| format!("applying the aggregate: {e}"))?;
    if model.params().iter().any(|v| !v.is_finite()) {
        return Err("the aggregate made the model non-finite".into());
    }
    Ok(RoundOutcome {
        model,
        selected: agg.selected,
    })
}

/// ε spent after `rounds` rounds of the job, when it adds noise.
pub(super) fn epsilon(spec: &JobSpec, rounds: u32) -> Option<f64> {
    let p = spec.privacy.as_ref()?;
    if p.noise_multiplier <= 0.0 {
        return None;
    }
    // Every trainer takes part in every round: no sampling amplification (q = 1).
    let budget = PrivacyBudget::new(1.0, p.noise_multiplier, p.delta, f64::INFINITY).ok()?;
    let e = budget.epsilon_after(u64::from(rounds));
    e.is_finite().then_some(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentmesh_federated::Architecture;

    fn spec(extra: &str) -> JobSpec {
        JobSpec::parse(&format!(
            r#"{{"model":"softmax","dataset_features":2,"classes":2,"rounds":1{extra}}}"#
        ))
        .expect("a valid job")
    }

    /// Four honest updates 0..3 and one far away: the median moves by the attacker's presence
    /// (2.0, the third of five), the median after mixing with f = 1 is the honest mean (1.5).
    #[test]
    fn the_jobs_mixing_runs_before_its_rule() {
        let arch = Architecture::Softmax {
            inputs: 2,
            classes: 2,
        };
        let zero = Model::from_params(arch.clone(), vec![0.0; arch.num_params()]).expect("model");
        let mut updates: Vec<(Vec<f32>, u64)> = (0..4)
            .map(|i| (vec![i as f32; arch.num_params()], 10))
            .collect();
        updates.push((vec![1000.0; arch.num_params()], 10));
        let result = |extra: &str| {
            aggregate(&spec(extra), &zero, &updates, None)
                .map(|o| o.model.params().to_vec())
                .expect("aggregates")
        };
        let plain = result(r#","aggregator":"median","byzantine":1"#);
        assert!(plain.iter().all(|&v| v == 2.0), "{plain:?}");
        let mixed = result(r#","aggregator":"median","byzantine":1,"mixing":"nnm""#);
        assert!(mixed.iter().all(|&v| v == 1.5), "{mixed:?}");
        // A round too small for the mixing fails with the reason.
        let err = aggregate(
            &spec(r#","aggregator":"median","byzantine":3,"mixing":"nnm""#),
            &zero,
            &updates,
            None,
        )
        .err()
        .unwrap_or_default();
        assert!(
            err.contains("mixing") && err.contains("at least 7"),
            "{err}"
        );
    }
}
