//! The aggregators against straightforward transcriptions of the papers'
//! definitions, plus the invariants a robust rule must keep.

use super::*;
use proptest::prelude::*;

// ---- reference implementations: the definitions, written plainly ----------

fn naive_fedavg(rows: &[Vec<f32>], examples: &[u64]) -> Vec<f64> {
    let total: f64 = examples.iter().map(|&e| e as f64).sum();
    (0..rows[0].len())
        .map(|k| {
            rows.iter()
                .zip(examples)
                .map(|(r, &e)| f64::from(r[k]) * e as f64 / total)
                .sum()
        })
        .collect()
}

fn naive_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum()
}

/// Krum scores of the members of `set` (Blanchard et al., Definition 1 with
/// the n − f − 2 nearest neighbours).
fn naive_krum_scores(rows: &[Vec<f32>], set: &[usize], f: usize) -> Vec<f64> {
    let k = set.len().saturating_sub(f + 2).max(1).min(set.len() - 1);
    set.iter()
        .map(|&i| {
            let mut d: Vec<f64> = set
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| naive_dist(&rows[i], &rows[j]))
                .collect();
            d.sort_by(f64::total_cmp);
            d[..k].iter().sum()
        })
        .collect()
}

fn column(rows: &[Vec<f32>], k: usize) -> Vec<f64> {
    let mut c: Vec<f64> = rows.iter().map(|r| f64::from(r[k])).collect();
    c.sort_by(f64::total_cmp);
    c
}

fn median_of(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn naive_median(rows: &[Vec<f32>]) -> Vec<f64> {
    (0..rows[0].len())
        .map(|k| median_of(&column(rows, k)))
        .collect()
}

fn naive_trimmed_mean(rows: &[Vec<f32>], beta: f64) -> Vec<f64> {
    let n = rows.len();
    let cut = (beta * n as f64).floor() as usize;
    (0..rows[0].len())
        .map(|k| {
            let c = column(rows, k);
            c[cut..n - cut].iter().sum::<f64>() / (n - 2 * cut) as f64
        })
        .collect()
}

/// Bulyan as El Mhamdi et al. describe it: θ = n − 2f rounds of Krum on the
/// remaining candidates, then per coordinate the mean of the β = θ − 2f
/// selected values closest to the median. Returns (selection, result).
fn naive_bulyan(rows: &[Vec<f32>], f: usize) -> (Vec<usize>, Vec<f64>) {
    let n = rows.len();
    let theta = n - 2 * f;
    let beta = theta - 2 * f;
    let mut candidates: Vec<usize> = (0..n).collect();
    let mut picked = Vec::new();
    while picked.len() < theta {
        let s = naive_krum_scores(rows, &candidates, f);
        let best = (0..s.len())
            .min_by(|&a, &b| s[a].total_cmp(&s[b]).then(a.cmp(&b)))
            .unwrap();
        picked.push(candidates.remove(best));
    }
    let chosen: Vec<Vec<f32>> = picked.iter().map(|&i| rows[i].clone()).collect();
    let out = (0..rows[0].len())
        .map(|k| {
            let c = column(&chosen, k);
            let m = median_of(&c);
            let mut by_distance = c.clone();
            by_distance.sort_by(|a, b| (a - m).abs().total_cmp(&(b - m).abs()));
            by_distance[..beta].iter().sum::<f64>() / beta as f64
        })
        .collect();
    (picked, out)
}

/// Nearest-neighbour mixing (Allouah et al. 2023): row i becomes the mean of the n − f rows
/// nearest it, ties to the lower index.
fn naive_nnm(rows: &[Vec<f32>], f: usize) -> Vec<Vec<f64>> {
    let n = rows.len();
    (0..n)
        .map(|i| {
            let mut order: Vec<(f64, usize)> = (0..n)
                .map(|j| (naive_dist(&rows[i], &rows[j]), j))
                .collect();
            order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let k = n - f;
            (0..rows[0].len())
                .map(|c| {
                    order[..k]
                        .iter()
                        .map(|&(_, j)| f64::from(rows[j][c]))
                        .sum::<f64>()
                        / k as f64
                })
                .collect()
        })
        .collect()
}

// ---- helpers --------------------------------------------------------------

fn valid(rows: &[Vec<f32>]) -> ValidUpdates {
    let dim = rows[0].len();
    let v = validate(
        rows.iter().map(|r| Update::new(r.clone(), 1)).collect(),
        dim,
    );
    assert!(v.rejected.is_empty());
    v.accepted
}

fn close(got: &[f32], want: &[f64], tol: f64) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs();
        prop_assert!(
            err <= tol * (1.0 + w.abs()),
            "coordinate {}: {} vs {}",
            k,
            g,
            w
        );
    }
    Ok(())
}

/// n rows of d values in ±100.
fn rows_strategy(n: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Vec<f32>>> {
    (n, 1usize..40).prop_flat_map(|(n, d)| {
        prop::collection::vec(prop::collection::vec(-100.0f32..100.0, d), n)
    })
}

/// The honest rows followed by `f` attackers, attacker a at `far · (a + 1)` on every
/// coordinate.
fn with_far_attackers(honest: &[Vec<f32>], f: usize, far: f32) -> Vec<Vec<f32>> {
    let dim = honest[0].len();
    let mut rows = honest.to_vec();
    rows.extend((0..f).map(|a| vec![far * (a as f32 + 1.0); dim]));
    rows
}

fn run(agg: &Aggregator, rows: &[Vec<f32>]) -> Aggregate {
    agg.aggregate(&valid(rows)).unwrap()
}

// ---- property tests against the definitions -------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fedavg_is_the_weighted_mean(rows in rows_strategy(1..12), seed in 0u64..1000) {
        let examples: Vec<u64> = (0..rows.len() as u64).map(|i| 1 + (seed * 7 + i * 13) % 50).collect();
        let updates = rows.iter().zip(&examples).map(|(r, &e)| Update::new(r.clone(), e)).collect();
        let v = validate(updates, rows[0].len()).accepted;
        let got = Aggregator::FedAvg.aggregate(&v).unwrap();
        close(&got.delta, &naive_fedavg(&rows, &examples), 1e-6)?;
    }

    #[test]
    fn krum_picks_a_minimum_score(rows in rows_strategy(5..16), f in 0usize..4, m in 1usize..5) {
        let n = rows.len();
        prop_assume!(n > 2 * f + 2);
        let all: Vec<usize> = (0..n).collect();
        let want = naive_krum_scores(&rows, &all, f);
        let min = want.iter().copied().fold(f64::INFINITY, f64::min);
        let krum = run(&Aggregator::Krum { f }, &rows);
        prop_assert_eq!(krum.selected.len(), 1);
        let pick = krum.selected[0];
        prop_assert!(want[pick] <= min * (1.0 + 1e-9));
        prop_assert_eq!(&krum.delta, &rows[pick]);
        for (i, s) in &krum.scores {
            prop_assert!((s - want[*i]).abs() <= 1e-9 * (1.0 + want[*i]));
        }
        // Multi-Krum: the m best, averaged without weights.
        let m = m.min(n);
        let multi = run(&Aggregator::MultiKrum { f, m }, &rows);
        let mut sorted = want.clone();
        sorted.sort_by(f64::total_cmp);
        for &i in &multi.selected {
            prop_assert!(want[i] <= sorted[m - 1] * (1.0 + 1e-9));
        }
        let chosen: Vec<Vec<f32>> = multi.selected.iter().map(|&i| rows[i].clone()).collect();
        close(&multi.delta, &naive_fedavg(&chosen, &vec![1; m]), 1e-6)?;
    }

    #[test]
    fn median_matches_definition(rows in rows_strategy(1..40)) {
        let got = run(&Aggregator::Median, &rows);
        close(&got.delta, &naive_median(&rows), 1e-7)?;
    }

    #[test]
    fn trimmed_mean_matches_definition(rows in rows_strategy(1..40), beta in 0.0f64..0.49) {
        let agg = Aggregator::TrimmedMean { beta };
        prop_assume!(agg.check(rows.len()).is_ok());
        let got = run(&agg, &rows);
        close(&got.delta, &naive_trimmed_mean(&rows, beta), 1e-6)?;
    }

    #[test]
    fn bulyan_matches_definition(rows in rows_strategy(3..24), f in 0usize..5) {
        prop_assume!(rows.len() >= 4 * f + 3);
        let (picked, want) = naive_bulyan(&rows, f);
        let got = run(&Aggregator::Bulyan { f }, &rows);
        prop_assert_eq!(&got.selected, &picked);
        close(&got.delta, &want, 1e-6)?;
    }

    #[test]
    fn coordinate_rules_are_permutation_invariant(rows in rows_strategy(3..20), shift in 1usize..19) {
        let mut rotated = rows.clone();
        rotated.rotate_left(shift % rows.len());
        for agg in [Aggregator::FedAvg, Aggregator::Median, Aggregator::TrimmedMean { beta: 0.2 }] {
            if agg.check(rows.len()).is_err() {
                continue;
            }
            let a = run(&agg, &rows).delta;
            let b = run(&agg, &rotated).delta;
            close(&a, &b.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), 1e-6)?;
        }
    }

    #[test]
    fn median_and_trimmed_mean_stay_within_range(rows in rows_strategy(1..30)) {
        for agg in [Aggregator::Median, Aggregator::TrimmedMean { beta: 0.1 }] {
            let got = run(&agg, &rows).delta;
            for (k, &g) in got.iter().enumerate() {
                let c = column(&rows, k);
                prop_assert!(f64::from(g) >= c[0] - 1e-4 && f64::from(g) <= c[c.len() - 1] + 1e-4);
            }
        }
    }

    /// With f attackers placed far from a tight honest cluster, the Krum family
    /// only ever selects honest updates and Bulyan/median stay in the honest range.
    #[test]
    fn robust_rules_ignore_far_attackers(
        honest in prop::collection::vec(prop::collection::vec(-1.0f32..1.0, 8), 11..16),
        f in 1usize..3,
        far in 50.0f32..1e4,
    ) {
        let rows = with_far_attackers(&honest, f, far);
        let h = honest.len();
        for agg in [
            Aggregator::Krum { f },
            Aggregator::MultiKrum { f, m: h - f },
            Aggregator::Bulyan { f },
        ] {
            if agg.check(rows.len()).is_err() {
                continue;
            }
            let out = run(&agg, &rows);
            prop_assert!(out.selected.iter().all(|&i| i < h), "{:?} picked {:?}", agg, out.selected);
        }
        for agg in [Aggregator::Median, Aggregator::Bulyan { f }, Aggregator::TrimmedMean { beta: 0.2 }] {
            let out = run(&agg, &rows);
            for (k, &g) in out.delta.iter().enumerate() {
                let c = column(&honest, k);
                prop_assert!(f64::from(g) >= c[0] - 1e-5 && f64::from(g) <= c[h - 1] + 1e-5);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn nnm_matches_definition(rows in rows_strategy(3..16), f in 1usize..8) {
        prop_assume!(rows.len() > 2 * f);
        let v = valid(&rows);
        let mixed = Mixing::Nnm { f }.apply(&v).unwrap();
        let mixed = mixed.updates();
        prop_assert_eq!(mixed.len(), v.len());
        prop_assert_eq!(mixed.origin(), v.origin());
        for (got, want) in mixed.updates().iter().zip(naive_nnm(&rows, f)) {
            close(&got.delta, &want, 1e-5)?;
            prop_assert_eq!(got.examples, 1);
        }
        // No mixing leaves the updates as they are.
        let unmixed = Mixing::None.apply(&v).unwrap();
        prop_assert_eq!(unmixed.updates(), &v);
        prop_assert_eq!(unmixed.sources(&[2, 0]), vec![2, 0]);
    }

    /// After mixing, f attackers far from the honest updates cannot drag a coordinate-wise
    /// rule outside the honest range: each honest update is mixed only with honest ones.
    #[test]
    fn nnm_keeps_far_attackers_out_of_honest_updates(
        honest in prop::collection::vec(prop::collection::vec(-1.0f32..1.0, 8), 5..12),
        f in 1usize..3,
        far in 50.0f32..1e4,
    ) {
        let rows = with_far_attackers(&honest, f, far);
        let h = honest.len();
        prop_assume!(h > f);
        let v = valid(&rows);
        let mixed = Mixing::Nnm { f }.apply(&v).unwrap();
        // Each honest update's n − f = h nearest are the h honest ones: it becomes their mean.
        let honest_mean = naive_fedavg(&honest, &vec![1; h]);
        for u in &mixed.updates().updates()[..h] {
            close(&u.delta, &honest_mean, 1e-5)?;
        }
        // And a rule that used honest updates only is reported as built from exactly them.
        prop_assert_eq!(mixed.sources(&[0]), (0..h).collect::<Vec<_>>());
        let median = Aggregator::Median.aggregate_after(&Mixing::Nnm { f }, &v).unwrap();
        close(&median.delta, &honest_mean, 1e-5)?;
    }
}

// ---- examples -------------------------------------------------------------

#[test]
fn nnm_preconditions_and_names() {
    let rows = vec![vec![1.0f32, 2.0]; 4];
    let v = valid(&rows);
    assert_eq!(
        Mixing::Nnm { f: 2 }.apply(&v).map(|_| ()),
        Err(AggregateError::TooFewUpdates {
            method: "nnm",
            n: 4,
            f: 2,
            needed: 5
        })
    );
    assert!(Mixing::Nnm { f: 1 }.apply(&v).is_ok());
    let err = Mixing::Nnm { f: 0 }.apply(&v).unwrap_err();
    assert!(err.to_string().contains("f ≥ 1"), "{err}");
    assert_eq!(Mixing::Nnm { f: 3 }.min_updates(), 7);
    assert_eq!(Mixing::None.min_updates(), 1);
    assert_eq!(Mixing::from_name("nnm", 3), Ok(Mixing::Nnm { f: 3 }));
    assert_eq!(Mixing::from_name("none", 3), Ok(Mixing::None));
    let err = Mixing::from_name("bucketing", 1).unwrap_err();
    assert!(err.to_string().contains("expected none or nnm"), "{err}");
    for m in [Mixing::None, Mixing::Nnm { f: 1 }] {
        assert_eq!(Mixing::from_name(m.name(), 1), Ok(m));
    }
}

#[test]
fn validation_rejects_with_reasons() {
    let updates = vec![
        Update::new(vec![1.0, 2.0], 3),
        Update::new(vec![1.0], 3),
        Update::new(vec![1.0, f32::NAN], 3),
        Update::new(vec![f32::INFINITY, 0.0], 3),
        Update::new(vec![0.0, 0.0], 0),
        Update::new(vec![5.0, 6.0], 1),
    ];
    let v = validate(updates, 2);
    assert_eq!(v.accepted.origin(), &[0, 5]);
    assert_eq!(
        v.rejected,
        vec![
            Rejection {
                index: 1,
                reason: RejectReason::WrongLength {
                    expected: 2,
                    found: 1
                }
            },
            Rejection {
                index: 2,
                reason: RejectReason::NotFinite { index: 1 }
            },
            Rejection {
                index: 3,
                reason: RejectReason::NotFinite { index: 0 }
            },
            Rejection {
                index: 4,
                reason: RejectReason::NoExamples
            },
        ]
    );
    let avg = Aggregator::FedAvg.aggregate(&v.accepted).unwrap();
    assert_eq!(avg.delta, vec![2.0, 3.0]);
    assert_eq!(avg.selected, vec![0, 5]);
}

#[test]
fn preconditions_are_typed_errors() {
    let rows: Vec<Vec<f32>> = (0..6).map(|i| vec![i as f32; 3]).collect();
    let v = valid(&rows);
    assert_eq!(
        Aggregator::Krum { f: 2 }.aggregate(&v),
        Err(AggregateError::TooFewUpdates {
            method: "krum",
            n: 6,
            f: 2,
            needed: 7
        })
    );
    assert!(Aggregator::Krum { f: 1 }.aggregate(&v).is_ok());
    assert!(matches!(
        Aggregator::Bulyan { f: 1 }.aggregate(&v),
        Err(AggregateError::TooFewUpdates { needed: 7, .. })
    ));
    assert!(matches!(
        Aggregator::MultiKrum { f: 1, m: 0 }.aggregate(&v),
        Err(AggregateError::BadParameter { .. })
    ));
    assert!(matches!(
        Aggregator::TrimmedMean { beta: 0.5 }.aggregate(&v),
        Err(AggregateError::BadParameter { .. })
    ));
    let empty = validate(vec![], 3).accepted;
    assert_eq!(
        Aggregator::Median.aggregate(&empty),
        Err(AggregateError::NoUpdates)
    );
}

/// Large enough to use several threads and ragged final blocks.
#[test]
fn large_inputs_match_the_definitions() {
    let (n, d): (usize, usize) = (9, 70_001);
    let rows: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            (0..d)
                .map(|k| ((i * 7919 + k * 104_729) % 1000) as f32 / 37.0 - 13.0)
                .collect()
        })
        .collect();
    let v = valid(&rows);
    let tol = |got: &[f32], want: &[f64]| {
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() <= 1e-5 * (1.0 + w.abs()));
        }
    };
    tol(
        &Aggregator::Median.aggregate(&v).unwrap().delta,
        &naive_median(&rows),
    );
    tol(
        &Aggregator::FedAvg.aggregate(&v).unwrap().delta,
        &naive_fedavg(&rows, &[1; 9]),
    );
    let (picked, want) = naive_bulyan(&rows, 1);
    let got = Aggregator::Bulyan { f: 1 }.aggregate(&v).unwrap();
    assert_eq!(got.selected, picked);
    tol(&got.delta, &want);
}

#[test]
fn distances_are_exact_for_close_updates() {
    // Two updates 1e-3 apart around 1e3: |x|² + |y|² − 2x·y in f32 loses
    // this entirely; widened differences do not.
    let a = vec![1000.0f32; 4096];
    let mut b = a.clone();
    b[17] += 0.001;
    let d = distance::Distances::compute(&[&a, &b]);
    let exact = (f64::from(b[17]) - 1000.0).powi(2);
    assert_eq!(d.get(0, 1), exact);
    assert_eq!(d.get(1, 0), exact);
}

#[test]
fn methods_by_name() {
    for agg in [
        Aggregator::FedAvg,
        Aggregator::Krum { f: 2 },
        Aggregator::MultiKrum { f: 2, m: 8 },
        Aggregator::TrimmedMean { beta: 0.1 },
        Aggregator::Median,
        Aggregator::Bulyan { f: 2 },
    ] {
        let again = Aggregator::from_method(agg.name(), 2, None, 0.1, 10).unwrap();
        assert_eq!(again, agg);
    }
    assert!(matches!(
        Aggregator::from_method("mean", 0, None, 0.0, 3),
        Err(AggregateError::UnknownMethod { .. })
    ));
}
