#include "common.cuh"

namespace {

constexpr unsigned THREADS = 256;

// One block per row. The sum x + residual goes to `out` first; mean and the biased variance are
// then taken in two passes over it (as the CPU op does), which keeps the variance accurate for
// rows with a large mean.
__global__ void __launch_bounds__(THREADS)
    add_layer_norm_f32(const float *__restrict__ x, const float *__restrict__ residual,
                       const float *__restrict__ weight, const float *__restrict__ bias,
                       float *__restrict__ out, uint32_t n, float eps) {
    __shared__ float scratch[32];
    const uint64_t base = static_cast<uint64_t>(blockIdx.x) * n;
    const float *xr = x + base;
    const float *rr = residual + base;
    float *o = out + base;

    float sum = 0.0f;
    for (uint32_t c = threadIdx.x; c < n; c += blockDim.x) {
        const float v = xr[c] + rr[c];
        o[c] = v;
        sum += v;
    }
    const float mean = fleet::block_sum(sum, scratch) / static_cast<float>(n);

    float sq = 0.0f;
    for (uint32_t c = threadIdx.x; c < n; c += blockDim.x) {
        const float d = o[c] - mean;
        sq += d * d;
    }
    const float var = fleet::block_sum(sq, scratch) / static_cast<float>(n);
    const float inv = rsqrtf(var + eps);

    for (uint32_t c = threadIdx.x; c < n; c += blockDim.x) {
        o[c] = (o[c] - mean) * inv * weight[c] + bias[c];
    }
}

}  // namespace

extern "C" int fleet_add_layer_norm_f32(const float *x, const float *residual,
                                        const float *params, float *out,
                                        FleetAddLayerNormParams p, cudaStream_t stream) {
    if (p.n == 0 || p.rows > 0x7fffffffull) {
        return FLEET_INVALID_VALUE;
    }
    if (p.rows == 0) {
        return 0;
    }
    add_layer_norm_f32<<<static_cast<unsigned>(p.rows), THREADS, 0, stream>>>(
        x, residual, params, params + p.n, out, p.n, p.eps);
    return fleet::launch_status();
}
