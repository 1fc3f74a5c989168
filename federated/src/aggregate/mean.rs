//! Weighted mean of updates (FedAvg, and the average of Multi-Krum's picks).

use super::parallel;

/// Coordinates per block: the `f64` accumulator (128 KiB) stays in L2 while
/// each update's slice of the block streams past once, a few updates at a
/// time, in long runs the hardware prefetcher follows.
const BLOCK: usize = 16384;

/// `Σ wᵢ·rowsᵢ` per coordinate with weights already normalised to sum to 1,
/// accumulated in `f64`. One pass over the input, memory-bound.
pub(crate) fn weighted_mean(rows: &[&[f32]], weights: &[f64]) -> Vec<f32> {
    let dim = rows.first().map_or(0, |r| r.len());
    let mut out = vec![0.0f32; dim];
    parallel::fill_chunks(&mut out, BLOCK, |start, chunk| {
        pulp::Arch::new().dispatch(MeanChunk {
            rows,
            weights,
            start,
            chunk,
        });
    });
    out
}

/// One thread's share; see `distance::Accumulate` for why a struct.
struct MeanChunk<'a> {
    rows: &'a [&'a [f32]],
    weights: &'a [f64],
    start: usize,
    chunk: &'a mut [f32],
}

impl pulp::WithSimd for MeanChunk<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let mut acc = vec![0.0f64; BLOCK];
        for (b, out_block) in self.chunk.chunks_mut(BLOCK).enumerate() {
            let from = self.start + b * BLOCK;
            let len = out_block.len();
            let acc = &mut acc[..len];
            acc.fill(0.0);
            // Four updates per pass over the accumulator cut its loads and
            // stores by four.
            let mut rows = self.rows.chunks_exact(4);
            let mut weights = self.weights.chunks_exact(4);
            for (r, w) in (&mut rows).zip(&mut weights) {
                let (r0, r1) = (&r[0][from..from + len], &r[1][from..from + len]);
                let (r2, r3) = (&r[2][from..from + len], &r[3][from..from + len]);
                for k in 0..len {
                    acc[k] += w[0] * f64::from(r0[k])
                        + w[1] * f64::from(r1[k])
                        + w[2] * f64::from(r2[k])
                        + w[3] * f64::from(r3[k]);
                }
            }
            for (row, &w) in rows.remainder().iter().zip(weights.remainder()) {
                for (a, &v) in acc.iter_mut().zip(&row[from..from + len]) {
                    *a += w * f64::from(v);
                }
            }
            for (o, &a) in out_block.iter_mut().zip(acc.iter()) {
                *o = a as f32;
            }
        }
    }
}
