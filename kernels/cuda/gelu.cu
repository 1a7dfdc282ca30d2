#include "common.cuh"

namespace {

// The erf form of GELU (PyTorch's default), with the accurate erff: the CPU op's rational
// approximation is within 1e-6 of it.
__global__ void bias_gelu_f32(const float *__restrict__ x, const float *__restrict__ bias,
                              float *__restrict__ out, uint64_t total, uint32_t n) {
    const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += stride) {
        const float v = x[i] + bias[i % n];
        out[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
}

}  // namespace

extern "C" int fleet_bias_gelu_f32(const float *x, const float *bias, float *out,
                                   FleetBiasGeluParams p, cudaStream_t stream) {
    if (p.n == 0) {
        return FLEET_INVALID_VALUE;
    }
    const uint64_t total = p.rows * p.n;
    if (total == 0) {
        return 0;
    }
    constexpr unsigned threads = 256;
    // Grid-stride loop: enough blocks to fill any current GPU, no more.
    const uint64_t wanted = (total + threads - 1) / threads;
    const unsigned blocks = static_cast<unsigned>(wanted < 65536 ? wanted : 65536);
    bias_gelu_f32<<<blocks, threads, 0, stream>>>(x, bias, out, total, p.n);
    return fleet::launch_status();
}
