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
            let mut block = vec![0.0f64; 2 * n * BLOCK];
            pulp::Arch::new().dispatch(Accumulate {
                rows,
                range,
                acc: &mut acc,
                block: &mut block,
            });
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
///
/// A `WithSimd` struct rather than a closure: pulp compiles `with_simd` with
/// the CPU's vector extensions (AVX2 or AVX-512) enabled, but only code inlined
/// into it benefits, and closures are not reliably inlined.
struct Accumulate<'a> {
    rows: &'a [&'a [f32]],
    range: std::ops::Range<usize>,
    acc: &'a mut [f64],
    block: &'a mut [f64],
}

impl pulp::WithSimd for Accumulate<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Self {
            rows,
            range,
            acc,
            block,
        } = self;
        accumulate(simd, rows, range, acc, block);
    }
}

#[inline(always)]
fn accumulate<S: pulp::Simd>(
    simd: S,
    rows: &[&[f32]],
    range: std::ops::Range<usize>,
    acc: &mut [f64],
    buffers: &mut [f64],
) {
    let n = rows.len();
    if range.is_empty() || n == 0 {
        return;
    }
    // Two blocks: the one being compared and the next, which is filled
    // (widened from the input) a row per tile, inside the tile's loop.
    let (mut current, mut next) = buffers.split_at_mut(n * BLOCK);
    let widen = |dst: &mut [f64], r: usize, from: usize, to: usize| {
        for (d, &s) in dst[r * BLOCK..r * BLOCK + (to - from)]
            .iter_mut()
            .zip(&rows[r][from..to])
        {
            *d = f64::from(s);
        }
    };
    let mut start = range.start;
    let first_end = (start + BLOCK).min(range.end);
    for r in 0..n {
        widen(current, r, start, first_end);
    }
    while start < range.end {
        let end = (start + BLOCK).min(range.end);
        let len = end - start;
        let next_end = (end + BLOCK).min(range.end);
        let mut pending = if end < next_end { 0 } else { n };
        {
            let block: &[f64] = current;
            let row = |i: usize| &block[i * BLOCK..i * BLOCK + len];
            // Pairs are visited in tiles of up to 2 rows × 4 rows: each loaded
            // vector of a row feeds several pairs (less traffic from L2), and
            // the pairs give independent accumulator chains.
            let mut i = 0;
            while i < n {
                let rows_i = (n - i).min(I_TILE);
                if rows_i == 2 {
                    acc[i * n + i + 1] += pair(simd, row(i), row(i + 1));
                }
                let mut j = i + rows_i;
                while j < n {
                    let rows_j = (n - j).min(J_TILE);
                    macro_rules! run {
                        ($I:literal, $J:literal) => {{
                            let widen_row: (&[f32], &mut [f64]) = if pending < n {
                                let r = pending;
                                pending += 1;
                                (
                                    &rows[r][end..next_end],
                                    &mut next[r * BLOCK..r * BLOCK + (next_end - end)],
                                )
                            } else {
                                (&[], &mut [])
                            };
                            let t = tile::<S, $I, $J>(
                                simd,
                                std::array::from_fn(|a| row(i + a)),
                                std::array::from_fn(|b| row(j + b)),
                                widen_row,
                            );
                            for (a, sums) in t.iter().enumerate() {
                                for (b, s) in sums.iter().enumerate() {
                                    acc[(i + a) * n + j + b] += s;
                                }
                            }
                        }};
                    }
                    match (rows_i, rows_j) {
                        (2, 4) => run!(2, 4),
                        (2, 3) => run!(2, 3),
                        (2, 2) => run!(2, 2),
                        (2, _) => run!(2, 1),
                        (_, 4) => run!(1, 4),
                        (_, 3) => run!(1, 3),
                        (_, 2) => run!(1, 2),
                        (_, _) => run!(1, 1),
                    }
                    j += rows_j;
                }
                i += rows_i;
            }
        }
        while pending < n {
            widen(next, pending, end, next_end);
            pending += 1;
        }
        std::mem::swap(&mut current, &mut next);
        start = end;
    }
}

/// Squared distance of one pair, with four accumulator chains so the loop is
/// not bound by FMA latency.
#[inline(always)]
fn pair<S: pulp::Simd>(simd: S, a: &[f64], b: &[f64]) -> f64 {
    let zero = simd.splat_f64s(0.0);
    let mut sums = [zero; 4];
    let (av, a_tail) = S::as_simd_f64s(a);
    let (bv, b_tail) = S::as_simd_f64s(b);
    let (a4, a_rest) = av.as_chunks::<4>();
    let (b4, b_rest) = bv.as_chunks::<4>();
    for (x, y) in a4.iter().zip(b4) {
        for u in 0..4 {
            let d = simd.sub_f64s(x[u], y[u]);
            sums[u] = simd.mul_add_e_f64s(d, d, sums[u]);
        }
    }
    for (&x, &y) in a_rest.iter().zip(b_rest) {
        let d = simd.sub_f64s(x, y);
        sums[0] = simd.mul_add_e_f64s(d, d, sums[0]);
    }
    let rest: f64 = a_tail
        .iter()
        .zip(b_tail)
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    sums.iter().map(|&s| simd.reduce_sum_f64s(s)).sum::<f64>() + rest
}

/// Rows per tile on each side (2 × 4 pairs × 8 lanes = 8 vector accumulators).
const I_TILE: usize = 2;
const J_TILE: usize = 4;

/// Squared distances between each of `a` and each of `b` (equal lengths),
/// one vector accumulator per pair. Written with explicit vectors: the
/// compiler does not vectorise this shape of loop nest on its own.
#[inline(always)]
fn tile<S: pulp::Simd, const I: usize, const J: usize>(
    simd: S,
    a: [&[f64]; I],
    b: [&[f64]; J],
    widen: (&[f32], &mut [f64]),
) -> [[f64; J]; I] {
    let zero = simd.splat_f64s(0.0);
    let mut sums = [[zero; J]; I];
    let av = a.map(|r| S::as_simd_f64s(r).0);
    let bv = b.map(|r| S::as_simd_f64s(r).0);
    let chunks = av.iter().chain(&bv).map(|v| v.len()).min().unwrap_or(0);
    // Widening a row of the next block, 8 values per step of the distance
    // loop, spreads its reads from memory thinly over the arithmetic, so the
    // cache misses overlap with it instead of stalling in a burst.
    let (src, dst) = widen;
    let (src8, src_rest) = src.as_chunks::<8>();
    let (dst8, dst_rest) = dst.as_chunks_mut::<8>();
    let mut pending = src8.iter().zip(dst8.iter_mut());
    for k in 0..chunks {
        let x: [S::f64s; I] = std::array::from_fn(|ii| av[ii][k]);
        for (jj, bj) in bv.iter().enumerate() {
            let y = bj[k];
            for (ii, &xi) in x.iter().enumerate() {
                let d = simd.sub_f64s(xi, y);
                sums[ii][jj] = simd.mul_add_e_f64s(d, d, sums[ii][jj]);
            }
        }
        if let Some((from, to)) = pending.next() {
            *to = from.map(f64::from);
        }
    }
    for (from, to) in pending {
        *to = from.map(f64::from);
    }
    for (t, &f) in dst_rest.iter_mut().zip(src_rest) {
        *t = f64::from(f);
    }
    let lanes = std::mem::size_of::<S::f64s>() / std::mem::size_of::<f64>();
    let tail = chunks * lanes;
    let mut out = [[0.0f64; J]; I];
    for ii in 0..I {
        for jj in 0..J {
            let rest: f64 = a[ii][tail..]
                .iter()
                .zip(&b[jj][tail..])
                .map(|(x, y)| (x - y) * (x - y))
                .sum();
            out[ii][jj] = simd.reduce_sum_f64s(sums[ii][jj]) + rest;
        }
    }
    out
}
