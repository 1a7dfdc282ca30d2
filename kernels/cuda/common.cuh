// Shared device helpers of the Fleet kernels.
#pragma once

#include <cuda_runtime.h>

#include "fleet_kernels.h"

namespace fleet {

constexpr unsigned FULL_MASK = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}

// Sum over the block, returned to every thread. `scratch` holds one value per warp (32 covers
// blocks of up to 1024 threads); the leading __syncthreads makes back-to-back calls that reuse
// `scratch` safe.
template <typename T>
__device__ T block_sum(T v, T *scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    T total = T(0);
    for (int w = 0; w < warps; ++w) {
        total += scratch[w];
    }
    return total;
}

// The error of the launch just made (cudaGetLastError also clears a sticky launch error, so a
// failure is reported once, by the call that caused it).
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace fleet
