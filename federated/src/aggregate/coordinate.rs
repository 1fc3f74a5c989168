//! Coordinate-wise statistics: median, trimmed mean and Bulyan's
//! "mean of the β values nearest the median".
//!
//! Per coordinate we need order statistics of `n` values. Instead of a
//! `select_nth_unstable` per coordinate (branchy, one coordinate at a time) the
//! coordinates are processed in blocks: the block of each update is copied into
//! a small row-major buffer (`n` rows × `lanes` coordinates, sized to stay in
//! L1), and a sorting network is applied row against row. Each comparator is a
//! lane-wise min/max over the whole row, which the compiler turns into vector
//! min/max instructions, so all coordinates of the block are sorted at once
//! with no data-dependent branches. The network is Batcher's odd–even merge
//! sort, pruned to the comparators that affect the ranks the statistic reads.

use super::parallel;

/// Buffer budget per block, in `f32`s (16 KiB, comfortably inside L1).
const BLOCK_FLOATS: usize = 4096;

/// A sorting network pruned to the comparators that can affect `ranks`.
#[derive(Clone, Debug)]
pub(crate) struct Network {
    comparators: Vec<(usize, usize)>,
}

impl Network {
    /// Batcher's odd–even merge sort for `n` wires, keeping only comparators
    /// that influence the output positions in `needed` (sorted ascending).
    pub(crate) fn new(n: usize, needed: std::ops::Range<usize>) -> Self {
        let mut full = Vec::new();
        let size = n.next_power_of_two();
        let mut p = 1;
        while p < size {
            let mut k = p;
            while k >= 1 {
                let mut j = k % p;
                while j + k < size {
                    for i in 0..k.min(size - j - k) {
                        let (a, b) = (i + j, i + j + k);
                        // Wires at or beyond n would carry +∞ padding, which a
                        // comparator never moves, so those comparators drop out.
                        if a / (2 * p) == b / (2 * p) && b < n {
                            full.push((a, b));
                        }
                    }
                    j += 2 * k;
                }
                k /= 2;
            }
            p *= 2;
        }
        let mut live = vec![false; n];
        for r in needed {
            if r < n {
                live[r] = true;
            }
        }
        let mut kept = Vec::with_capacity(full.len());
        for &(a, b) in full.iter().rev() {
            if live[a] || live[b] {
                live[a] = true;
                live[b] = true;
                kept.push((a, b));
            }
        }
        kept.reverse();
        Self { comparators: kept }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.comparators.len()
    }

    /// Sorts each column of a row-major `n × lanes` buffer (at the ranks the
    /// network was built for).
    #[inline(always)]
    fn sort_columns(&self, buf: &mut [f32], lanes: usize) {
        for &(a, b) in &self.comparators {
            let (low, high) = buf.split_at_mut(b * lanes);
            let ra = &mut low[a * lanes..(a + 1) * lanes];
            let rb = &mut high[..lanes];
            for (x, y) in ra.iter_mut().zip(rb.iter_mut()) {
                let (p, q) = (*x, *y);
                // Inputs are finite (validated), so plain comparisons give
                // min/max without NaN handling and map to vector instructions.
                *x = if p < q { p } else { q };
                *y = if p < q { q } else { p };
            }
        }
    }
}

/// What to compute from each sorted column.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Statistic {
    /// The median (mean of the two middle values when `n` is even).
    Median,
    /// Mean after dropping `cut` values from each end.
    TrimmedMean { cut: usize },
    /// Mean of the `beta` values nearest the median.
    NearestMedian { beta: usize },
}

impl Statistic {
    fn needed_ranks(self, n: usize) -> std::ops::Range<usize> {
        match self {
            Self::Median => (n - 1) / 2..n / 2 + 1,
            Self::TrimmedMean { cut } => cut..n - cut,
            // The β nearest form a window around the middle.
            Self::NearestMedian { beta } => (n / 2).saturating_sub(beta)..(n / 2 + beta).min(n),
        }
    }
}

/// Applies `stat` coordinate-wise to `rows` (equal lengths, finite values,
/// at least one row; the caller checked the statistic fits `n`).
pub(crate) fn coordinate_wise(rows: &[&[f32]], stat: Statistic) -> Vec<f32> {
    let n = rows.len();
    let dim = rows.first().map_or(0, |r| r.len());
    let network = Network::new(n, stat.needed_ranks(n));
    let lanes = (BLOCK_FLOATS / n.max(1)).clamp(16, 1024) / 16 * 16;
    let mut out = vec![0.0f32; dim];
    parallel::fill_chunks(&mut out, lanes, |start, chunk| {
        pulp::Arch::new().dispatch(Blocks {
            rows,
            network: &network,
            stat,
            lanes,
            start,
            chunk,
        });
    });
    out
}

/// One thread's share of the coordinates, block by block. A `WithSimd`
/// struct so the network's min/max loops are compiled with the CPU's vector
/// extensions (see `distance::Accumulate`).
struct Blocks<'a> {
    rows: &'a [&'a [f32]],
    network: &'a Network,
    stat: Statistic,
    lanes: usize,
    start: usize,
    chunk: &'a mut [f32],
}

impl pulp::WithSimd for Blocks<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let n = self.rows.len();
        let lanes = self.lanes;
        let mut buf = vec![0.0f32; n * lanes];
        for (b, out_block) in self.chunk.chunks_mut(lanes).enumerate() {
            let from = self.start + b * lanes;
            let len = out_block.len();
            for (row, dst) in self.rows.iter().zip(buf.chunks_exact_mut(lanes)) {
                dst[..len].copy_from_slice(&row[from..from + len]);
            }
            self.network.sort_columns(&mut buf, lanes);
            finish(&buf, lanes, n, self.stat, out_block);
        }
    }
}

/// Reads the statistic out of the sorted buffer for the first `out.len()` lanes.
#[inline(always)]
fn finish(buf: &[f32], lanes: usize, n: usize, stat: Statistic, out: &mut [f32]) {
    let len = out.len();
    let row = |r: usize| &buf[r * lanes..r * lanes + len];
    match stat {
        Statistic::Median => {
            if n % 2 == 1 {
                out.copy_from_slice(row(n / 2));
            } else {
                for ((o, &a), &b) in out.iter_mut().zip(row(n / 2 - 1)).zip(row(n / 2)) {
                    *o = ((f64::from(a) + f64::from(b)) * 0.5) as f32;
                }
            }
        }
        Statistic::TrimmedMean { cut } => {
            let mut sums = vec![0.0f64; len];
            for r in cut..n - cut {
                for (s, &v) in sums.iter_mut().zip(row(r)) {
                    *s += f64::from(v);
                }
            }
            let kept = (n - 2 * cut) as f64;
            for (o, s) in out.iter_mut().zip(sums) {
                *o = (s / kept) as f32;
            }
        }
        Statistic::NearestMedian { beta } => {
            // The β values nearest the median of a sorted column are a
            // contiguous window, and among all windows of β it is the one
            // whose farthest member is nearest the median. So every candidate
            // start w is scored lane-wise (radius = max(m − s[w],
            // s[w+β−1] − m)) with a sliding window sum: no per-coordinate
            // branches, all vector selects. Ties go to the lower window.
            let at = |r: usize, l: usize| f64::from(buf[r * lanes + l]);
            let median: Vec<f64> = (0..len)
                .map(|l| {
                    if n % 2 == 1 {
                        at(n / 2, l)
                    } else {
                        (at(n / 2 - 1, l) + at(n / 2, l)) * 0.5
                    }
                })
                .collect();
            let first = (n / 2).saturating_sub(beta);
            let last = (n / 2).min(n - beta);
            let mut sum = vec![0.0f64; len];
            for r in first..first + beta {
                for (s, &v) in sum.iter_mut().zip(row(r)) {
                    *s += f64::from(v);
                }
            }
            let mut best_radius = vec![f64::INFINITY; len];
            let mut best_sum = vec![0.0f64; len];
            for w in first..=last {
                if w > first {
                    let (add, drop) = (row(w + beta - 1), row(w - 1));
                    for ((s, &a), &d) in sum.iter_mut().zip(add).zip(drop) {
                        *s += f64::from(a) - f64::from(d);
                    }
                }
                let (low, high) = (row(w), row(w + beta - 1));
                let best = best_radius.iter_mut().zip(best_sum.iter_mut());
                let window = sum.iter().zip(&median).zip(low.iter().zip(high));
                for ((r, b), ((&s, &m), (&lo, &hi))) in best.zip(window) {
                    let (below, above) = (m - f64::from(lo), f64::from(hi) - m);
                    // Plain selects, not f64::max or a branch: no NaN here, and
                    // they vectorise to max and blend instructions.
                    let radius = if below > above { below } else { above };
                    let better = radius < *r;
                    *r = if better { radius } else { *r };
                    *b = if better { s } else { *b };
                }
            }
            for (o, s) in out.iter_mut().zip(best_sum) {
                *o = (s / beta as f64) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The 0-1 principle: a network sorts every input iff it sorts every 0/1
    /// input. Checked exhaustively for small n, at the ranks it was pruned to.
    #[test]
    fn networks_sort_all_zero_one_inputs() {
        for n in 1..=14 {
            for needed in [0..n, (n - 1) / 2..n / 2 + 1, n / 3..n - n / 3] {
                let net = Network::new(n, needed.clone());
                for bits in 0u32..(1 << n) {
                    let mut v: Vec<f32> = (0..n).map(|i| ((bits >> i) & 1) as f32).collect();
                    let mut sorted = v.clone();
                    sorted.sort_by(f32::total_cmp);
                    net.sort_columns(&mut v, 1);
                    for r in needed.clone() {
                        assert_eq!(v[r], sorted[r], "n={n} bits={bits:b} rank {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn pruning_saves_comparators() {
        let full = Network::new(30, 0..30).len();
        let median = Network::new(30, 14..16).len();
        assert!(median < full, "{median} vs {full}");
    }

    proptest! {
        #[test]
        fn networks_sort_floats(v in prop::collection::vec(-1e6f32..1e6, 1..140)) {
            let n = v.len();
            let mut buf = v.clone();
            Network::new(n, 0..n).sort_columns(&mut buf, 1);
            let mut sorted = v;
            sorted.sort_by(f32::total_cmp);
            prop_assert_eq!(buf, sorted);
        }
    }
}
