//! Pairwise squared Euclidean distances between updates, computed once per
//! round and shared by Krum, Multi-Krum and Bulyan's repeated selection.
//!
//! Exactness over speed tricks: every coordinate is widened to `f64` before the
//! subtraction, so a difference and its square are exact up to `f64` rounding
//! and the sum accumulates in `f64`. The expansion |x|² + |y|² − 2x·y would save
//! a subtraction but cancels badly when updates are close, which is exactly
//! when Krum's choice matters.

use super::parallel;

/// Coordinates per cache block: `n` rows of this many `f64` stay in L2 while
/// every pair in the block is visited.
const BLOCK: usize = 512;

/// Independent accumulators in the inner loop, enough to hide add latency on
/// 512-bit vectors.
const LANES: usize = 32;

/// A symmetric `n × n` matrix of squared distances with a zero diagonal.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Distances {
    n: usize,
    d2: Vec<f64>,
}

impl Distances {
    /// Computes all pairwise squared distances of `rows` (equal lengths).
    pub(crate) fn compute(rows: &[&[f32]]) -> Self {
        let n = rows.len();
        let dim = rows.first().map_or(0, |r| r.len());
        let partials = parallel::map_ranges(dim, BLOCK, |range| {
            let mut acc = vec![0.0f64; n * n];
            let mut block = vec![0.0f64; n * BLOCK];
            pulp::Arch::new().dispatch(|| accumulate(rows, range, &mut acc, &mut block));
            acc
        });
        let mut d2 = vec![0.0f64; n * n];
        for part in partials {
            for (t, p) in d2.iter_mut().zip(part) {
                *t += p;
            }
        }
        for i in 0..n {
            for j in 0..i {
                d2[i * n + j] = d2[j * n + i];
            }
        }
        Self { n, d2 }
    }

    /// Squared distance between rows `i` and `j`.
    pub(crate) fn get(&self, i: usize, j: usize) -> f64 {
        self.d2[i * self.n + j]
    }
}

/// Adds the squared distances over `range` of every pair `i < j` into
/// `acc[i * n + j]`, one cache block of coordinates at a time.
#[inline(always)]
fn accumulate(
    rows: &[&[f32]],
    range: std::ops::Range<usize>,
    acc: &mut [f64],
    block: &mut [f64],
) {
    let n = rows.len();
    let mut start = range.start;
    while start < range.end {
        let end = (start + BLOCK).min(range.end);
        let len = end - start;
        for (row, dst) in rows.iter().zip(block.chunks_exact_mut(BLOCK)) {
            for (d, &s) in dst[..len].iter_mut().zip(&row[start..end]) {
                *d = f64::from(s);
            }
        }
        for i in 0..n {
            let a = &block[i * BLOCK..i * BLOCK + len];
            for j in i + 1..n {
                let b = &block[j * BLOCK..j * BLOCK + len];
                acc[i * n + j] += squared_distance(a, b);
            }
        }
        start = end;
    }
}

#[inline(always)]
fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    let mut sums = [0.0f64; LANES];
    let (a_chunks, a_tail) = a.as_chunks::<LANES>();
    let (b_chunks, b_tail) = b.as_chunks::<LANES>();
    for (x, y) in a_chunks.iter().zip(b_chunks) {
        for k in 0..LANES {
            let d = x[k] - y[k];
            sums[k] += d * d;
        }
    }
    let mut total: f64 = a_tail
        .iter()
        .zip(b_tail)
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    for s in sums {
        total += s;
    }
    total
}
