// CPU building blocks of the scoring ops: a register-blocked small matrix product and the MLP
// forward over a tile of rows.
//
// The tiles are a few dozen rows wide and the layers at most a few hundred, far below where a
// BLAS call pays for itself, so the products are written out with GCC vector types. Every hot
// function is always_inline over the vector width kBytes and is compiled into each ISA clone of
// the kernels (isa.h), at that clone's hardware width: 16, 32 or 64 bytes.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>

#include "ops/cpu/isa.h"
#include "ops/mlp_args.h"

namespace s2meta {
namespace cpu {

// Columns [j0, j0 + 2 * VW) of C (= or +=) A B: a 4-row x 2-vector block of C lives in 8
// registers while k runs, so each load of B feeds four FMAs.
template <typename T, int kBytes, bool kAccumulate>
S2META_ALWAYS_INLINE void gemm_strip2(T* __restrict C, int64_t ldc, const T* __restrict A, int64_t ars, int64_t aks,
                                      const T* __restrict B, int64_t ldb, int64_t rows, int64_t K, int64_t j0) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int64_t VW = kBytes / sizeof(T);
  int64_t r0 = 0;
  for (; r0 + 4 <= rows; r0 += 4) {
    V c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
    const T* a = A + r0 * ars;
    const T* b = B + j0;
    for (int64_t k = 0; k < K; ++k, a += aks, b += ldb) {
      const V b0 = load<V>(b), b1 = load<V>(b + VW);
      const T a0 = a[0], a1 = a[ars], a2 = a[2 * ars], a3 = a[3 * ars];
      c00 += a0 * b0;
      c01 += a0 * b1;
      c10 += a1 * b0;
      c11 += a1 * b1;
      c20 += a2 * b0;
      c21 += a2 * b1;
      c30 += a3 * b0;
      c31 += a3 * b1;
    }
    T* c = C + r0 * ldc + j0;
    if (kAccumulate) {
      c00 += load<V>(c), c01 += load<V>(c + VW);
      c10 += load<V>(c + ldc), c11 += load<V>(c + ldc + VW);
      c20 += load<V>(c + 2 * ldc), c21 += load<V>(c + 2 * ldc + VW);
      c30 += load<V>(c + 3 * ldc), c31 += load<V>(c + 3 * ldc + VW);
    }
    std::memcpy(c, &c00, sizeof(V));
    std::memcpy(c + VW, &c01, sizeof(V));
    std::memcpy(c + ldc, &c10, sizeof(V));
    std::memcpy(c + ldc + VW, &c11, sizeof(V));
    std::memcpy(c + 2 * ldc, &c20, sizeof(V));
    std::memcpy(c + 2 * ldc + VW, &c21, sizeof(V));
    std::memcpy(c + 3 * ldc, &c30, sizeof(V));
    std::memcpy(c + 3 * ldc + VW, &c31, sizeof(V));
  }
  for (; r0 < rows; ++r0) {
    V c0 = {}, c1 = {};
    const T* a = A + r0 * ars;
    const T* b = B + j0;
    for (int64_t k = 0; k < K; ++k, a += aks, b += ldb) {
      c0 += a[0] * load<V>(b);
      c1 += a[0] * load<V>(b + VW);
    }
    T* c = C + r0 * ldc + j0;
    if (kAccumulate) c0 += load<V>(c), c1 += load<V>(c + VW);
    std::memcpy(c, &c0, sizeof(V));
    std::memcpy(c + VW, &c1, sizeof(V));
  }
}

// Columns [j0, j0 + VW): the same with one vector per row.
template <typename T, int kBytes, bool kAccumulate>
S2META_ALWAYS_INLINE void gemm_strip1(T* __restrict C, int64_t ldc, const T* __restrict A, int64_t ars, int64_t aks,
                                      const T* __restrict B, int64_t ldb, int64_t rows, int64_t K, int64_t j0) {
  using V = typename Vec<T, kBytes>::type;
  int64_t r0 = 0;
  for (; r0 + 4 <= rows; r0 += 4) {
    V c0 = {}, c1 = {}, c2 = {}, c3 = {};
    const T* a = A + r0 * ars;
    const T* b = B + j0;
    for (int64_t k = 0; k < K; ++k, a += aks, b += ldb) {
      const V bk = load<V>(b);
      c0 += a[0] * bk;
      c1 += a[ars] * bk;
      c2 += a[2 * ars] * bk;
      c3 += a[3 * ars] * bk;
    }
    T* c = C + r0 * ldc + j0;
    if (kAccumulate) {
      c0 += load<V>(c), c1 += load<V>(c + ldc), c2 += load<V>(c + 2 * ldc), c3 += load<V>(c + 3 * ldc);
    }
    std::memcpy(c, &c0, sizeof(V));
    std::memcpy(c + ldc, &c1, sizeof(V));
    std::memcpy(c + 2 * ldc, &c2, sizeof(V));
    std::memcpy(c + 3 * ldc, &c3, sizeof(V));
  }
  for (; r0 < rows; ++r0) {
    V c0 = {};
    const T* a = A + r0 * ars;
    const T* b = B + j0;
    for (int64_t k = 0; k < K; ++k, a += aks, b += ldb) c0 += a[0] * load<V>(b);
    T* c = C + r0 * ldc + j0;
    if (kAccumulate) c0 += load<V>(c);
    std::memcpy(c, &c0, sizeof(V));
  }
}

// C[r, j] (= or +=) sum_k A[r * ars + k * aks] * B[k * ldb + j] for r < rows, j0 <= j < cols.
// A's strides let the same code multiply by a transposed operand (the weight gradient). Columns
// go in strips of two vectors, then one; what is left narrower than a vector falls to the next
// smaller vector width and finally to scalar loops (the score column).
template <typename T, int kBytes, bool kAccumulate>
S2META_ALWAYS_INLINE void gemm_tile(T* __restrict C, int64_t ldc, const T* __restrict A, int64_t ars, int64_t aks,
                                    const T* __restrict B, int64_t ldb, int64_t rows, int64_t K, int64_t cols,
                                    int64_t j0 = 0) {
  constexpr int64_t VW = kBytes / sizeof(T);
  for (; j0 + 2 * VW <= cols; j0 += 2 * VW) gemm_strip2<T, kBytes, kAccumulate>(C, ldc, A, ars, aks, B, ldb, rows, K, j0);
  if (j0 + VW <= cols) {
    gemm_strip1<T, kBytes, kAccumulate>(C, ldc, A, ars, aks, B, ldb, rows, K, j0);
    j0 += VW;
  }
  if (j0 >= cols) return;
  if constexpr (kBytes > 16) {
    gemm_tile<T, kBytes / 2, kAccumulate>(C, ldc, A, ars, aks, B, ldb, rows, K, cols, j0);
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = j0; j < cols; ++j) {
        T sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += A[r * ars + k * aks] * B[k * ldb + j];
        C[r * ldc + j] = kAccumulate ? C[r * ldc + j] + sum : sum;
      }
    }
  }
}

inline int64_t weights_per_scenario(const MlpArgs& mlp) {
  int64_t n = 0;
  for (int l = 0; l < mlp.num_layers(); ++l) n += mlp.in(l) * mlp.out(l);
  return n;
}

// Per-layer [in, out] copies of every scenario's weights, [S, weights_per_scenario]: the forward
// product then streams contiguous rows of W^T (see gemm_tile) instead of reducing along rows of W.
template <typename T>
at::Tensor transposed_weights(const MlpArgs& mlp, const MlpView<T>& view, const at::Tensor& like) {
  const int64_t per = weights_per_scenario(mlp);
  at::Tensor wt = at::empty({mlp.scenarios, per}, like.options());
  T* base = wt.mutable_data_ptr<T>();
  at::parallel_for(0, mlp.scenarios, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      T* out = base + s * per;
      for (int l = 0; l < view.num_layers; ++l) {
        const T* w = view.w[l] + s * view.w_stride[l];
        const int64_t in = view.in[l], o = view.out[l];
        for (int64_t i = 0; i < in; ++i)
          for (int64_t j = 0; j < o; ++j) out[i * o + j] = w[j * in + i];
        out += in * o;
      }
    }
  });
  return wt;
}

// Pointers to layer l's transposed weights of scenario s inside transposed_weights' output.
template <typename T>
void point_at_scenario(const MlpArgs& mlp, const T* wt_all, int64_t s, const T** wt) {
  const T* p = wt_all + s * weights_per_scenario(mlp);
  for (int l = 0; l < mlp.num_layers(); ++l) {
    wt[l] = p;
    p += mlp.in(l) * mlp.out(l);
  }
}

// act[l + 1] = relu(act[l] W_l^T + b_l) for layers first..L-1, no ReLU after the last layer.
// act[l] is [rows, width of layer l's input], wt[l] the transposed weights of layer l.
template <typename T, int kBytes>
S2META_ALWAYS_INLINE void mlp_forward_tile(const MlpView<T>& mlp, int64_t s, const T* const* wt, T* const* act,
                                           int64_t rows, int first) {
  const int last = mlp.num_layers - 1;
  for (int l = first; l <= last; ++l) {
    const int64_t in = mlp.in[l], out = mlp.out[l];
    T* z = act[l + 1];
    gemm_tile<T, kBytes, false>(z, out, act[l], in, 1, wt[l], out, rows, in, out);
    const T* b = mlp.b[l] + s * mlp.b_stride[l];
    for (int64_t r = 0; r < rows; ++r) {
      T* zr = z + r * out;
      if (l < last) {
        for (int64_t j = 0; j < out; ++j) {
          const T v = zr[j] + b[j];
          zr[j] = v < T(0) ? T(0) : v;  // NaN passes through, as in torch.relu
        }
      } else {
        for (int64_t j = 0; j < out; ++j) zr[j] += b[j];
      }
    }
  }
}

}  // namespace cpu
}  // namespace s2meta
