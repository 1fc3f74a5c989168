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
            let mut block = vec![0.0f64; n * BLOCK];
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
        let row = |i: usize| &block[i * BLOCK..i * BLOCK + len];
        // Pairs are visited in tiles of 2 rows × 4 rows: each loaded vector of
        // a row feeds several pairs, which halves the traffic from L2.
        let mut i = 0;
        while i < n {
            let i_tile = (n - i).min(I_TILE);
            if i_tile == I_TILE {
                acc[i * n + i + 1] += tile::<S, 1, 1>(simd, [row(i)], [row(i + 1)])[0][0];
            }
            let mut j = i + i_tile;
            while j < n {
                if i_tile == I_TILE && n - j >= J_TILE {
                    let t = tile::<S, I_TILE, J_TILE>(
                        simd,
                        [row(i), row(i + 1)],
                        [row(j), row(j + 1), row(j + 2), row(j + 3)],
                    );
                    for (a, sums) in t.iter().enumerate() {
                        for (b, s) in sums.iter().enumerate() {
                            acc[(i + a) * n + j + b] += s;
                        }
                    }
                    j += J_TILE;
                } else {
                    for a in i..i + i_tile {
                        acc[a * n + j] += tile::<S, 1, 1>(simd, [row(a)], [row(j)])[0][0];
                    }
                    j += 1;
                }
            }
            i += i_tile;
        }
        start = end;
    }
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
) -> [[f64; J]; I] {
    let zero = simd.splat_f64s(0.0);
    let mut sums = [[zero; J]; I];
    let av = a.map(|r| S::as_simd_f64s(r).0);
    let bv = b.map(|r| S::as_simd_f64s(r).0);
    let chunks = av.iter().chain(&bv).map(|v| v.len()).min().unwrap_or(0);
    for k in 0..chunks {
        let x: [S::f64s; I] = std::array::from_fn(|ii| av[ii][k]);
        for (jj, bj) in bv.iter().enumerate() {
            let y = bj[k];
            for (ii, &xi) in x.iter().enumerate() {
                let d = simd.sub_f64s(xi, y);
                sums[ii][jj] = simd.mul_add_e_f64s(d, d, sums[ii][jj]);
            }
        }
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
