// score_matrix on the CPU: out[s, a, b] = f(user_emb[s, a], item_emb[s, b]) for every pair.
//
// The first layer splits as W1 [e_u; e_i] + b1 = (W1u e_u + b1) + W1i e_i, so
//   U = user_emb W1u^T + b1  [A, h1]   and   V = item_emb W1i^T  [B, h1]
// cost A + B matvecs; each pair then starts from relu(U[a] + V[b]) (no ReLU when the MLP has one
// layer) and runs the remaining layers, kPairs item columns of one user row per tile.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "ops/cpu/mlp_tile.h"
#include "ops/score_matrix.h"

namespace s2meta {
namespace {

constexpr int64_t kPairs = 64;
constexpr int64_t kRowsPerTask = 32;  // rows of U or V per first-layer task

// rows x (W1 half)^T for `rows` embeddings starting at e (row stride ld); `half_wt` is the d rows
// of the transposed first layer that belong to this side.
template <typename T, int kBytes>
S2META_ALWAYS_INLINE void first_layer_rows(const T* e, int64_t ld, int64_t rows, int64_t d, const T* half_wt,
                                           int64_t h1, const T* bias, T* out) {
  cpu::gemm_tile<T, kBytes, false>(out, h1, e, ld, 1, half_wt, h1, rows, d, h1);
  if (bias != nullptr) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < h1; ++j) out[r * h1 + j] += bias[j];
  }
}

template <typename T>
void first_layer_rows_base(const T* e, int64_t ld, int64_t rows, int64_t d, const T* half_wt, int64_t h1,
                           const T* bias, T* out) {
  first_layer_rows<T, 16>(e, ld, rows, d, half_wt, h1, bias, out);
}

template <typename T>
S2META_TARGET_AVX2 void first_layer_rows_avx2(const T* e, int64_t ld, int64_t rows, int64_t d, const T* half_wt,
                                              int64_t h1, const T* bias, T* out) {
  first_layer_rows<T, 32>(e, ld, rows, d, half_wt, h1, bias, out);
}

template <typename T>
S2META_TARGET_AVX512 void first_layer_rows_avx512(const T* e, int64_t ld, int64_t rows, int64_t d,
                                                  const T* half_wt, int64_t h1, const T* bias, T* out) {
  first_layer_rows<T, 64>(e, ld, rows, d, half_wt, h1, bias, out);
}

template <typename T>
void first_layer_rows_any(int bytes, const T* e, int64_t ld, int64_t rows, int64_t d, const T* half_wt, int64_t h1,
                          const T* bias, T* out) {
  if (bytes == 64) {
    first_layer_rows_avx512(e, ld, rows, d, half_wt, h1, bias, out);
  } else if (bytes == 32) {
    first_layer_rows_avx2(e, ld, rows, d, half_wt, h1, bias, out);
  } else {
    first_layer_rows_base(e, ld, rows, d, half_wt, h1, bias, out);
  }
}

// Scores of user row u against items [b0, b0 + cols): act[1] = relu(u + V rows), then layers 1...
template <typename T, int kBytes>
S2META_ALWAYS_INLINE void pair_tile(const MlpView<T>& mlp, int64_t s, const T* const* wt, T* const* act,
                                    const T* u, const T* v, int64_t cols, T* out) {
  const int64_t h1 = mlp.out[0];
  T* x = act[1];
  if (mlp.num_layers == 1) {
    for (int64_t c = 0; c < cols; ++c) out[c] = u[0] + v[c];
    return;
  }
  for (int64_t c = 0; c < cols; ++c) {
    const T* vc = v + c * h1;
    T* xc = x + c * h1;
    for (int64_t j = 0; j < h1; ++j) {
      const T z = u[j] + vc[j];
      xc[j] = z < T(0) ? T(0) : z;
    }
  }
  cpu::mlp_forward_tile<T, kBytes>(mlp, s, wt, act, cols, 1);
  std::copy(act[mlp.num_layers], act[mlp.num_layers] + cols, out);
}

template <typename T>
void pair_tile_base(const MlpView<T>& mlp, int64_t s, const T* const* wt, T* const* act, const T* u, const T* v,
                    int64_t cols, T* out) {
  pair_tile<T, 16>(mlp, s, wt, act, u, v, cols, out);
}

template <typename T>
S2META_TARGET_AVX2 void pair_tile_avx2(const MlpView<T>& mlp, int64_t s, const T* const* wt, T* const* act,
                                       const T* u, const T* v, int64_t cols, T* out) {
  pair_tile<T, 32>(mlp, s, wt, act, u, v, cols, out);
}

template <typename T>
S2META_TARGET_AVX512 void pair_tile_avx512(const MlpView<T>& mlp, int64_t s, const T* const* wt, T* const* act,
                                           const T* u, const T* v, int64_t cols, T* out) {
  pair_tile<T, 64>(mlp, s, wt, act, u, v, cols, out);
}

template <typename T>
void pair_tile_any(int bytes, const MlpView<T>& mlp, int64_t s, const T* const* wt, T* const* act, const T* u,
                   const T* v, int64_t cols, T* out) {
  if (bytes == 64) {
    pair_tile_avx512(mlp, s, wt, act, u, v, cols, out);
  } else if (bytes == 32) {
    pair_tile_avx2(mlp, s, wt, act, u, v, cols, out);
  } else {
    pair_tile_base(mlp, s, wt, act, u, v, cols, out);
  }
}

at::Tensor score_matrix_cpu(const at::Tensor& user_emb, const at::Tensor& item_emb, at::TensorList weights,
                            at::TensorList biases) {
  const ScoreMatrixInputs in = prepare_score_matrix("score_matrix", user_emb, item_emb, weights, biases);
  const MlpArgs& mlp = in.mlp;
  const int64_t S = mlp.scenarios, A = in.users.size(1), B = in.items.size(1), d = mlp.dim, h1 = mlp.out(0);
  at::Tensor out = at::empty({S, A, B}, user_emb.options());
  if (S * A * B > 0) {
    AT_DISPATCH_FLOATING_TYPES(user_emb.scalar_type(), "score_matrix_cpu", [&] {
      using T = scalar_t;
      const MlpView<T> view = mlp.view<T>();
      const int bytes = cpu::vector_bytes(cpu::isa());
      const at::Tensor wt = cpu::transposed_weights<T>(mlp, view, user_emb);
      const int64_t wt_per = cpu::weights_per_scenario(mlp);
      at::Tensor uv = at::empty({S, A + B, h1}, user_emb.options());
      T* uv_ptr = uv.mutable_data_ptr<T>();
      const T* users = in.users.const_data_ptr<T>();
      const T* items = in.items.const_data_ptr<T>();
      const int64_t blocks = (A + B + kRowsPerTask - 1) / kRowsPerTask;
      at::parallel_for(0, S * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t s = task / blocks;
          const int64_t r0 = (task % blocks) * kRowsPerTask, r1 = std::min(A + B, r0 + kRowsPerTask);
          const T* wt0 = wt.const_data_ptr<T>() + s * wt_per;  // [2d, h1]: user rows, then item rows
          const T* b0 = view.b[0] + s * view.b_stride[0];
          T* dst = uv_ptr + (s * (A + B) + r0) * h1;
          // A block may straddle the user/item boundary: split it there.
          const int64_t mid = std::clamp(A, r0, r1);
          if (mid > r0) {
            const T* e = users + s * in.users.stride(0) + r0 * in.users.stride(1);
            first_layer_rows_any<T>(bytes, e, in.users.stride(1), mid - r0, d, wt0, h1, b0, dst);
          }
          if (r1 > mid) {
            const T* e = items + s * in.items.stride(0) + (mid - A) * in.items.stride(1);
            first_layer_rows_any<T>(bytes, e, in.items.stride(1), r1 - mid, d, wt0 + d * h1, h1, nullptr,
                                    dst + (mid - r0) * h1);
          }
        }
      });
      const int64_t col_blocks = (B + kPairs - 1) / kPairs;
      T* out_ptr = out.mutable_data_ptr<T>();
      at::parallel_for(0, S * A * col_blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> storage;
        T* act[kMaxLayers + 1] = {};
        int64_t total = 0;
        for (int l = 0; l < mlp.num_layers(); ++l) total += kPairs * mlp.out(l);
        storage.resize(total);
        T* p = storage.data();
        for (int l = 0; l < mlp.num_layers(); ++l) {
          act[l + 1] = p;
          p += kPairs * mlp.out(l);
        }
        const T* wt_s[kMaxLayers];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t s = task / (A * col_blocks), a = (task / col_blocks) % A, c0 = (task % col_blocks) * kPairs;
          const int64_t cols = std::min(kPairs, B - c0);
          cpu::point_at_scenario(mlp, wt.const_data_ptr<T>(), s, wt_s);
          const T* u = uv_ptr + (s * (A + B) + a) * h1;
          const T* v = uv_ptr + (s * (A + B) + A + c0) * h1;
          T* o = out_ptr + (s * A + a) * B + c0;
          pair_tile_any(bytes, view, s, wt_s, act, u, v, cols, o);
        }
      });
    });
  }
  return mlp.batched ? out : out.squeeze(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(s2meta, CPU, m) { m.impl("score_matrix", &score_matrix_cpu); }

}  // namespace s2meta
