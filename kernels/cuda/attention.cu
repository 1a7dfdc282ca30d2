#include "common.cuh"

namespace {

constexpr unsigned WARPS_PER_BLOCK = 4;
constexpr unsigned PER_LANE = FLEET_ATTENTION_MAX_HEAD_DIM / 32;

// One warp per (query token, head), online softmax over the keys of the token's sequence (as
// flash attention does, without the tiling): each lane holds head_dim / 32 columns of the query
// and of the running output, a key's score is a warp reduction. Simple and exact; sequences of
// the encoder are short (<= 512 tokens), so this is not the bottleneck next to the GEMMs.
__global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)
    varlen_attention_f32(const float *__restrict__ qkv, const uint32_t *__restrict__ cu_seqlens,
                         float *__restrict__ out, uint32_t tokens, uint32_t batch,
                         uint32_t heads, uint32_t head_dim, float scale) {
    const uint64_t item = static_cast<uint64_t>(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / 32;
    if (item >= static_cast<uint64_t>(tokens) * heads) {
        return;
    }
    const uint32_t t = static_cast<uint32_t>(item / heads);
    const uint32_t h = static_cast<uint32_t>(item % heads);
    const unsigned lane = threadIdx.x & 31;

    // The sequence owning row t: the last b with cu_seqlens[b] <= t (empty sequences before it
    // share its start, hence "last").
    uint32_t lo = 0, hi = batch;  // invariant: cu[lo] <= t < cu[hi]
    while (hi - lo > 1) {
        const uint32_t mid = (lo + hi) / 2;
        if (cu_seqlens[mid] <= t) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    const uint32_t start = cu_seqlens[lo];
    const uint32_t end = cu_seqlens[lo + 1];

    const uint64_t hidden = static_cast<uint64_t>(heads) * head_dim;
    const uint64_t width = 3 * hidden;
    const float *q = qkv + t * width + static_cast<uint64_t>(h) * head_dim;

    float qr[PER_LANE];
    float acc[PER_LANE];
#pragma unroll
    for (unsigned i = 0; i < PER_LANE; ++i) {
        const uint32_t d = lane + 32 * i;
        qr[i] = d < head_dim ? q[d] * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY;
    float l = 0.0f;
    for (uint32_t j = start; j < end; ++j) {
        const float *k = qkv + j * width + hidden + static_cast<uint64_t>(h) * head_dim;
        const float *v = k + hidden;
        float dot = 0.0f;
#pragma unroll
        for (unsigned i = 0; i < PER_LANE; ++i) {
            const uint32_t d = lane + 32 * i;
            if (d < head_dim) {
                dot += qr[i] * k[d];
            }
        }
        const float s = fleet::warp_sum(dot);
        const float m_new = fmaxf(m, s);
        // exp(-inf) = 0 rescales the empty state on the first key.
        const float corr = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (unsigned i = 0; i < PER_LANE; ++i) {
            const uint32_t d = lane + 32 * i;
            acc[i] = acc[i] * corr + (d < head_dim ? p * v[d] : 0.0f);
        }
        m = m_new;
    }
    // Row t belongs to its sequence, so the sequence has at least one key and l >= 1.
    const float inv = 1.0f / l;
    float *o = out + t * hidden + static_cast<uint64_t>(h) * head_dim;
#pragma unroll
    for (unsigned i = 0; i < PER_LANE; ++i) {
        const uint32_t d = lane + 32 * i;
        if (d < head_dim) {
            o[d] = acc[i] * inv;
        }
    }
}

}  // namespace

extern "C" int fleet_varlen_attention_f32(const float *qkv, const uint32_t *cu_seqlens,
                                          float *out, FleetVarlenAttentionParams p,
                                          cudaStream_t stream) {
    if (p.heads == 0 || p.head_dim == 0 || p.head_dim > FLEET_ATTENTION_MAX_HEAD_DIM ||
        p.batch == 0) {
        return p.tokens == 0 ? 0 : FLEET_INVALID_VALUE;
    }
    const uint64_t items = static_cast<uint64_t>(p.tokens) * p.heads;
    if (items == 0) {
        return 0;
    }
    const uint64_t blocks = (items + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK;
    if (blocks > 0x7fffffffull) {
        return FLEET_INVALID_VALUE;
    }
    varlen_attention_f32<<<static_cast<unsigned>(blocks), WARPS_PER_BLOCK * 32, 0, stream>>>(
        qkv, cu_seqlens, out, p.tokens, p.batch, p.heads, p.head_dim, p.scale);
    return fleet::launch_status();
}
