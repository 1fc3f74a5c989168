//! Krum scores (Blanchard et al. 2017) over a precomputed distance matrix.

use super::distance::Distances;

/// Krum score of each member of `set` (indices into the distance matrix): the
/// sum of squared distances to its `set.len() − f − 2` nearest other members
/// (at least one, at most all others). Returned in `set` order.
pub(crate) fn scores(distances: &Distances, set: &[usize], f: usize) -> Vec<f64> {
    let s = set.len();
    let neighbours = s.saturating_sub(f + 2).max(1).min(s.saturating_sub(1));
    let mut row = Vec::with_capacity(s);
    set.iter()
        .map(|&i| {
            row.clear();
            row.extend(
                set.iter()
                    .filter(|&&j| j != i)
                    .map(|&j| distances.get(i, j)),
            );
            if neighbours == 0 {
                return 0.0;
            }
            row.select_nth_unstable_by(neighbours - 1, f64::total_cmp);
            row[..neighbours].iter().sum()
        })
        .collect()
}

/// Positions in `scores` of the `m` lowest scores, lowest first; ties go to
/// the earlier position so the choice is deterministic.
pub(crate) fn best(scores: &[f64], m: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(m);
    order
}
