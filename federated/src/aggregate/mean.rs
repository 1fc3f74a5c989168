//! Weighted mean of updates (FedAvg, and the average of Multi-Krum's picks).

use super::parallel;

/// Coordinates per block: the `f64` accumulator (16 KiB) stays in L1 while
/// each update's slice of the block streams past once.
const BLOCK: usize = 2048;

/// `Σ wᵢ·rowsᵢ` per coordinate with weights already normalised to sum to 1,
/// accumulated in `f64`. One pass over the input, memory-bound.
pub(crate) fn weighted_mean(rows: &[&[f32]], weights: &[f64]) -> Vec<f32> {
    let dim = rows.first().map_or(0, |r| r.len());
    let mut out = vec![0.0f32; dim];
    parallel::fill_chunks(&mut out, BLOCK, |start, chunk| {
        let mut acc = vec![0.0f64; BLOCK];
        pulp::Arch::new().dispatch(|| {
            for (b, out_block) in chunk.chunks_mut(BLOCK).enumerate() {
                let from = start + b * BLOCK;
                let len = out_block.len();
                let acc = &mut acc[..len];
                acc.fill(0.0);
                for (row, &w) in rows.iter().zip(weights) {
                    for (a, &v) in acc.iter_mut().zip(&row[from..from + len]) {
                        *a += w * f64::from(v);
                    }
                }
                for (o, &a) in out_block.iter_mut().zip(acc.iter()) {
                    *o = a as f32;
                }
            }
        });
    });
    out
}
