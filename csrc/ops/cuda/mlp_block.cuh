// Block-cooperative MLP layers for the scoring kernels: one thread block pushes a tile of rows
// through a layer held in shared memory (or, when it does not fit, read from global memory).
//
// Activations live in shared memory with a padded row stride (width + 1) so the threads of a
// warp, which take consecutive rows of one output column, hit distinct banks; the weight row they
// share is a broadcast.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "ops/mlp_args.h"

namespace s2meta {
namespace cuda {

constexpr int kThreads = 256;

__host__ __device__ inline int padded(int64_t width) { return static_cast<int>(width) + 1; }

// The largest dynamic shared memory a block may opt in to on the current device.
inline size_t max_shared_bytes() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

template <typename Kernel>
void allow_shared_bytes(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Copies scenario s's weights and biases into shared memory (row-major [out, in], then [out]) and
// points w/b at them; with use_shared false, points w/b at global memory instead.
template <typename T>
__device__ void stage_weights(const MlpView<T>& mlp, int64_t s, bool use_shared, T* smem, const T** w, const T** b) {
  for (int l = 0; l < mlp.num_layers; ++l) {
    const T* gw = mlp.w[l] + s * mlp.w_stride[l];
    const T* gb = mlp.b[l] + s * mlp.b_stride[l];
    const int nw = static_cast<int>(mlp.in[l] * mlp.out[l]), nb = static_cast<int>(mlp.out[l]);
    if (use_shared) {
      for (int i = threadIdx.x; i < nw; i += blockDim.x) smem[i] = gw[i];
      for (int i = threadIdx.x; i < nb; i += blockDim.x) smem[nw + i] = gb[i];
      w[l] = smem;
      b[l] = smem + nw;
      smem += nw + nb;
    } else {
      w[l] = gw;
      b[l] = gb;
    }
  }
  __syncthreads();
}

// Tiles of `rows` rows for the layers' input (act[0]) and each layer's output (act[l + 1]), with
// padded strides ld; returns the first free element after them.
template <typename T>
__device__ T* carve_tiles(const MlpView<T>& mlp, T* p, int rows, T** act, int* ld) {
  ld[0] = padded(mlp.in[0]);
  act[0] = p;
  p += rows * ld[0];
  for (int l = 0; l < mlp.num_layers; ++l) {
    ld[l + 1] = padded(mlp.out[l]);
    act[l + 1] = p;
    p += rows * ld[l + 1];
  }
  return p;
}

template <typename T>
size_t tile_elements(const MlpView<T>& mlp, int rows) {
  size_t n = static_cast<size_t>(rows) * padded(mlp.in[0]);
  for (int l = 0; l < mlp.num_layers; ++l) n += static_cast<size_t>(rows) * padded(mlp.out[l]);
  return n;
}

// y[r, o] = relu?(b[o] + sum_i x[r, i] w[o, i]) for r < rows, o < out.
template <typename T>
__device__ void layer_forward(const T* x, int ldx, T* y, int ldy, const T* w, const T* b, int rows, int in, int out,
                              bool relu) {
  for (int idx = threadIdx.x; idx < rows * out; idx += blockDim.x) {
    const int r = idx % rows, o = idx / rows;
    const T* xr = x + r * ldx;
    const T* wo = w + o * in;
    T z = b[o];
    for (int i = 0; i < in; ++i) z += xr[i] * wo[i];
    y[r * ldy + o] = relu ? (z < T(0) ? T(0) : z) : z;  // NaN passes, as torch.relu
  }
}

// dw[o, i] (+)= sum_r dz[r, o] x[r, i] and db[o] (+)= sum_r dz[r, o], each entry owned by one
// thread and summed in row order, so the block's partial is deterministic.
template <typename T>
__device__ void layer_weight_grad(const T* dz, int lddz, const T* x, int ldx, T* dw, T* db, int rows, int in, int out,
                                  bool accumulate) {
  for (int idx = threadIdx.x; idx < out * in; idx += blockDim.x) {
    const int o = idx / in, i = idx % in;
    T sum = 0;
    for (int r = 0; r < rows; ++r) sum += dz[r * lddz + o] * x[r * ldx + i];
    dw[idx] = accumulate ? dw[idx] + sum : sum;
  }
  for (int o = threadIdx.x; o < out; o += blockDim.x) {
    T sum = 0;
    for (int r = 0; r < rows; ++r) sum += dz[r * lddz + o];
    db[o] = accumulate ? db[o] + sum : sum;
  }
}

// dx[r, i] = sum_o dz[r, o] w[o, i], zeroed where the ReLU output x[r, i] <= 0 when mask is set.
template <typename T>
__device__ void layer_input_grad(const T* dz, int lddz, const T* w, const T* x, int ldx, T* dx, int lddx, int rows,
                                 int in, int out, bool mask) {
  for (int idx = threadIdx.x; idx < rows * in; idx += blockDim.x) {
    const int r = idx / in, i = idx % in;
    T sum = 0;
    for (int o = 0; o < out; ++o) sum += dz[r * lddz + o] * w[o * in + i];
    dx[r * lddx + i] = (mask && x[r * ldx + i] <= T(0)) ? T(0) : sum;
  }
}

}  // namespace cuda
}  // namespace s2meta
