use rayon::prelude::*;

use super::simd::simd_fn;
use super::{ShapeError, ensure, math, rows_per_task};

const LANES: usize = 16;

simd_fn! {
    /// In place over one row of attention scores: `row[j] = softmax_j(scale * row[j])` over
    /// `j < valid`, and `row[j] = 0` for `j >= valid`. A fully masked row (`valid == 0`) becomes
    /// all zeros, never NaN. `valid` larger than the row is treated as the whole row.
    pub fn scaled_softmax_row(row: &mut [f32], valid: usize, scale: f32) {
        let valid = valid.min(row.len());
        let (live, masked) = row.split_at_mut(valid);
        masked.fill(0.0);
        if live.is_empty() {
            return;
        }
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = live.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *x *= scale;
                *a = a.max(*x);
            }
        }
        let mut max = f32::NEG_INFINITY;
        for x in chunks.into_remainder() {
            *x *= scale;
            max = max.max(*x);
        }
        let max = acc.iter().fold(max, |m, &a| m.max(a));
        let mut sums = [0.0f32; LANES];
        let mut chunks = live.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (s, x) in sums.iter_mut().zip(c) {
                *x = math::exp(*x - max);
                *s += *x;
            }
        }
        let mut sum = 0.0f32;
        for x in chunks.into_remainder() {
            *x = math::exp(*x - max);
            sum += *x;
        }
        // exp(max - max) = 1 is one of the terms, so the sum is at least 1.
        let inv = 1.0 / (sum + sums.iter().sum::<f32>());
        for x in live.iter_mut() {
            *x *= inv;
        }
    }
}

/// Lanes of the padded rows of [`softmax_lane_row`].
pub(crate) const ROW_LANES: usize = LANES;

simd_fn! {
    /// In place: `row = softmax(row)` for a row whose length is a multiple of [`ROW_LANES`],
    /// padded at the end with `-inf` (which come out as exactly 0). Without a
    /// scalar tail this runs at full vector width even for short rows, which is most rows of
    /// attention over short texts.
    pub(crate) fn softmax_lane_row(row: &mut [f32]) {
        let mut acc = [f32::NEG_INFINITY; LANES];
        for c in row.chunks_exact(LANES) {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a = a.max(x);
            }
        }
        let max = acc.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
        let mut sums = [0.0f32; LANES];
        for c in row.chunks_exact_mut(LANES) {
            for (s, x) in sums.iter_mut().zip(c) {
                *x = math::exp(*x - max);
                *s += *x;
            }
        }
        let inv = 1.0 / sums.iter().sum::<f32>();
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// Scaled, key-masked softmax over padded attention scores.
///
/// * `scores`: row-major `[batch, heads, q_len, k_len]`; `out` gets the same layout.
/// * `lengths`: `[batch]`; for batch entry `b` keys `j < lengths[b]` take part and the rest get
///   probability 0. Every query row is computed (padded query rows too, as the padded
///   reference implementations do). `lengths[b] == 0` gives rows of zeros.
///
/// `out[b, h, i, j] = exp(scale * s_ij - m) / sum_{j' < len_b} exp(scale * s_ij' - m)`.
pub fn scaled_masked_softmax(
    scores: &[f32],
    dims: [usize; 4],
    lengths: &[u32],
    scale: f32,
    out: &mut Vec<f32>,
) -> Result<(), ShapeError> {
    let [batch, heads, q_len, k_len] = dims;
    let total = batch * heads * q_len * k_len;
    ensure(scores.len() == total, || {
        format!(
            "scaled_masked_softmax: {} scores for dims {dims:?}",
            scores.len(),
        )
    })?;
    ensure(lengths.len() == batch, || {
        format!(
            "scaled_masked_softmax: {} lengths for batch {batch}",
            lengths.len()
        )
    })?;
    ensure(lengths.iter().all(|&l| l as usize <= k_len), || {
        format!("scaled_masked_softmax: a length exceeds k_len {k_len}")
    })?;
    out.clear();
    out.extend_from_slice(scores);
    if total == 0 {
        return Ok(());
    }
    let rows_per_batch = heads * q_len;
    let rows = rows_per_task(k_len, 1 << 14);
    out.par_chunks_mut(rows * k_len)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, row) in chunk.chunks_exact_mut(k_len).enumerate() {
                let b = (task * rows + i) / rows_per_batch;
                scaled_softmax_row(row, lengths[b] as usize, scale);
            }
        });
    Ok(())
}
