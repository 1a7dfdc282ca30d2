/*
 * Fleet fused encoder kernels: the C interface between the CUDA sources in this folder and Rust
 * (kernels/build.rs runs bindgen over this header).
 *
 * Every launch function takes device pointers, a parameter struct and the stream to launch on,
 * and returns 0 on success or a cudaError_t value: FLEET_INVALID_VALUE (cudaErrorInvalidValue)
 * for parameters the kernel cannot handle, else the error of the launch. Launches are
 * asynchronous; a fault inside a kernel shows up on a later call on the stream.
 *
 * Layouts are those of the CPU ops in kernels/src/ops (the reference): row-major, contiguous,
 * f32 data, u32 offsets/lengths/flags.
 */
#ifndef FLEET_KERNELS_H
#define FLEET_KERNELS_H

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_runtime_api.h>
#else
/* The runtime's stream handle, declared as cuda_runtime_api.h does (the driver's CUstream is the
 * same pointer), so that bindgen needs no CUDA headers. */
typedef struct CUstream_st *cudaStream_t;
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* cudaErrorInvalidValue, returned for parameters a kernel cannot run with. */
#define FLEET_INVALID_VALUE 1

/* out[r, c] = gelu_erf(x[r, c] + bias[c]); x and out are rows x n. */
typedef struct FleetBiasGeluParams {
    uint64_t rows;
    uint32_t n;
} FleetBiasGeluParams;

/* out = layer_norm(x + residual) * weight + bias over rows of n (biased variance, eps inside the
 * square root, as torch.nn.LayerNorm); params is [2, n]: weight, then bias. */
typedef struct FleetAddLayerNormParams {
    uint64_t rows;
    uint32_t n;
    float eps;
} FleetAddLayerNormParams;

/* Scores [batch, heads, q_len, k_len]; lengths [batch]: keys j < lengths[b] are real. Masked
 * keys get 0; a fully masked row is all zeros. */
typedef struct FleetMaskedSoftmaxParams {
    uint32_t batch;
    uint32_t heads;
    uint32_t q_len;
    uint32_t k_len;
    float scale;
} FleetMaskedSoftmaxParams;

/* hidden [tokens, dim] in the varlen layout, cu_seqlens [batch + 1], normalize [batch];
 * out [batch, dim]: the mean of each sequence's rows, L2-normalised (norm floor 1e-12) where
 * normalize[b] != 0; an empty sequence gives zeros. */
typedef struct FleetMeanPoolParams {
    uint32_t tokens;
    uint32_t batch;
    uint32_t dim;
} FleetMeanPoolParams;

/* Largest head_dim fleet_varlen_attention_f32 accepts. */
#define FLEET_ATTENTION_MAX_HEAD_DIM 128

/* qkv [tokens, 3 * heads * head_dim] (row t = [q | k | v]), cu_seqlens [batch + 1];
 * out [tokens, heads * head_dim]: softmax(scale * q k^T) v per head over the keys of the
 * query's own sequence. */
typedef struct FleetVarlenAttentionParams {
    uint32_t tokens;
    uint32_t batch;
    uint32_t heads;
    uint32_t head_dim;
    float scale;
} FleetVarlenAttentionParams;

int fleet_bias_gelu_f32(const float *x, const float *bias, float *out, FleetBiasGeluParams p,
                        cudaStream_t stream);

int fleet_add_layer_norm_f32(const float *x, const float *residual, const float *params,
                             float *out, FleetAddLayerNormParams p, cudaStream_t stream);

int fleet_scaled_masked_softmax_f32(const float *scores, const uint32_t *lengths, float *out,
                                    FleetMaskedSoftmaxParams p, cudaStream_t stream);

int fleet_mean_pool_normalize_f32(const float *hidden, const uint32_t *cu_seqlens,
                                  const uint32_t *normalize, float *out, FleetMeanPoolParams p,
                                  cudaStream_t stream);

int fleet_varlen_attention_f32(const float *qkv, const uint32_t *cu_seqlens, float *out,
                               FleetVarlenAttentionParams p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FLEET_KERNELS_H */
