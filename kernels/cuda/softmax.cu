#include "common.cuh"

namespace {

constexpr unsigned WARPS_PER_BLOCK = 8;

// One warp per row of k_len scores. Three passes over the row (max, sum of exponentials,
// normalise): rows are short (at most the sequence length) and stay in L1/L2.
__global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)
    scaled_masked_softmax_f32(const float *__restrict__ scores,
                              const uint32_t *__restrict__ lengths, float *__restrict__ out,
                              uint64_t rows, uint64_t rows_per_batch, uint32_t k_len,
                              float scale) {
    const uint64_t row = static_cast<uint64_t>(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / 32;
    if (row >= rows) {
        return;
    }
    const unsigned lane = threadIdx.x & 31;
    const uint32_t len = lengths[row / rows_per_batch];
    const uint32_t valid = len < k_len ? len : k_len;
    const float *s = scores + row * k_len;
    float *o = out + row * k_len;

    float m = -INFINITY;
    for (uint32_t j = lane; j < valid; j += 32) {
        m = fmaxf(m, scale * s[j]);
    }
    m = fleet::warp_max(m);
    float sum = 0.0f;
    for (uint32_t j = lane; j < valid; j += 32) {
        sum += expf(scale * s[j] - m);
    }
    sum = fleet::warp_sum(sum);
    // valid > 0 makes exp(m - m) = 1 one of the terms, so sum >= 1; valid == 0 never reads it.
    const float inv = valid > 0 ? 1.0f / sum : 0.0f;
    for (uint32_t j = lane; j < k_len; j += 32) {
        o[j] = j < valid ? expf(scale * s[j] - m) * inv : 0.0f;
    }
}

}  // namespace

extern "C" int fleet_scaled_masked_softmax_f32(const float *scores, const uint32_t *lengths,
                                               float *out, FleetMaskedSoftmaxParams p,
                                               cudaStream_t stream) {
    const uint64_t rows_per_batch = static_cast<uint64_t>(p.heads) * p.q_len;
    const uint64_t rows = rows_per_batch * p.batch;
    if (rows == 0 || p.k_len == 0) {
        return 0;
    }
    const uint64_t blocks = (rows + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK;
    if (blocks > 0x7fffffffull) {
        return FLEET_INVALID_VALUE;
    }
    scaled_masked_softmax_f32<<<static_cast<unsigned>(blocks), WARPS_PER_BLOCK * 32, 0, stream>>>(
        scores, lengths, out, rows, rows_per_batch, p.k_len, p.scale);
    return fleet::launch_status();
}
