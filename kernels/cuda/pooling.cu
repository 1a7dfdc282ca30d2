#include "common.cuh"

namespace {

constexpr unsigned THREADS = 256;
constexpr double NORM_EPS = 1e-12;
// The dynamic shared memory every GPU grants without an opt-in: dim up to 6144 columns.
constexpr size_t MAX_SHARED = 48 * 1024;

// One block per sequence, threads over the columns (coalesced row reads). Sums in double, as
// the CPU op, so both agree to f32 rounding whatever the sequence length.
__global__ void __launch_bounds__(THREADS)
    mean_pool_normalize_f32(const float *__restrict__ hidden,
                            const uint32_t *__restrict__ cu_seqlens,
                            const uint32_t *__restrict__ normalize, float *__restrict__ out,
                            uint32_t dim) {
    __shared__ double scratch[32];
    // The column sums, `dim` doubles (dynamic shared memory): kept in double until the scale.
    extern __shared__ double sums[];
    const uint32_t b = blockIdx.x;
    const uint32_t start = cu_seqlens[b];
    const uint32_t end = cu_seqlens[b + 1];
    float *o = out + static_cast<uint64_t>(b) * dim;
    if (end <= start) {
        for (uint32_t c = threadIdx.x; c < dim; c += blockDim.x) {
            o[c] = 0.0f;
        }
        return;
    }
    const double inv_count = 1.0 / static_cast<double>(end - start);
    const bool norm = normalize[b] != 0;

    double sq = 0.0;
    for (uint32_t c = threadIdx.x; c < dim; c += blockDim.x) {
        double acc = 0.0;
        for (uint32_t r = start; r < end; ++r) {
            acc += static_cast<double>(hidden[static_cast<uint64_t>(r) * dim + c]);
        }
        const double mean = acc * inv_count;
        sq += mean * mean;
        sums[c] = acc;
    }
    double scale = inv_count;
    if (norm) {
        const double n = sqrt(fleet::block_sum(sq, scratch));
        scale = inv_count / (n > NORM_EPS ? n : NORM_EPS);
    }
    // Each thread reads back only the sums it wrote, so no barrier is needed here.
    for (uint32_t c = threadIdx.x; c < dim; c += blockDim.x) {
        o[c] = static_cast<float>(sums[c] * scale);
    }
}

}  // namespace

extern "C" int fleet_mean_pool_normalize_f32(const float *hidden, const uint32_t *cu_seqlens,
                                             const uint32_t *normalize, float *out,
                                             FleetMeanPoolParams p, cudaStream_t stream) {
    const size_t shared = static_cast<size_t>(p.dim) * sizeof(double);
    if (p.dim == 0 || p.batch > 0x7fffffffu || shared > MAX_SHARED) {
        return FLEET_INVALID_VALUE;
    }
    if (p.batch == 0) {
        return 0;
    }
    mean_pool_normalize_f32<<<p.batch, THREADS, shared, stream>>>(hidden, cu_seqlens, normalize, out,
                                                             p.dim);
    return fleet::launch_status();
}
