// hinge_score and its fused backward on the CPU (the math is in ops/hinge_score.h).
//
// The N triples of a scenario are cut into chunks of kTriples; a chunk's 2 * kTriples rows
// (its positives, then its negatives) go through the MLP together as one tile (mlp_tile.h).
// The backward fuses, per chunk: the forward, the hinge, the backward through every layer and
// the accumulation of the weight/bias gradients into the partial of the chunk's slot. Slots are
// a fixed split of the chunks that depends on (S, N) only and are summed in slot order, so the
// result is the same whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common.h"
#include "ops/cpu/mlp_tile.h"
#include "ops/hinge_score.h"

namespace s2meta {
namespace {

constexpr int64_t kTriples = 16;
// Enough slots to keep 16 cores busy on a single scenario; more would only add reduction work,
// and a slot of fewer than kMinChunksPerSlot chunks costs more to zero and sum than it saves.
constexpr int64_t kMaxSlotsPerCall = 16;
constexpr int64_t kMinChunksPerSlot = 4;

template <typename T>
struct Embeddings {
  const T* user;
  const T* pos;
  const T* neg;
  int64_t s_stride[3];
  int64_t n_stride[3];
  int64_t dim;
};

template <typename T>
Embeddings<T> embeddings_of(const HingeInputs& in) {
  const at::Tensor* e[3] = {&in.user, &in.pos, &in.neg};
  Embeddings<T> v{};
  v.user = in.user.const_data_ptr<T>();
  v.pos = in.pos.const_data_ptr<T>();
  v.neg = in.neg.const_data_ptr<T>();
  for (int k = 0; k < 3; ++k) {
    v.s_stride[k] = e[k]->stride(0);
    v.n_stride[k] = e[k]->stride(1);
  }
  v.dim = in.mlp.dim;
  return v;
}

// Scratch of one thread: activations of every layer and two gradient buffers for a tile.
template <typename T>
struct Tile {
  std::vector<T> storage;
  T* act[kMaxLayers + 1];
  T* delta[2];
  const T* wt[kMaxLayers];

  Tile(const MlpArgs& mlp, int64_t rows) {
    int64_t total = rows * (mlp.in(0) + 2 * mlp.max_width);
    for (int l = 0; l < mlp.num_layers(); ++l) total += rows * mlp.out(l);
    storage.resize(total);
    T* p = storage.data();
    act[0] = p;
    p += rows * mlp.in(0);
    for (int l = 0; l < mlp.num_layers(); ++l) {
      act[l + 1] = p;
      p += rows * mlp.out(l);
    }
    delta[0] = p;
    delta[1] = p + rows * mlp.max_width;
  }

  void point_at_scenario(const MlpArgs& mlp, const T* wt_all, int64_t s) {
    cpu::point_at_scenario(mlp, wt_all, s, wt);
  }
};

// Rows [0, t) of act[0] are [u; i+] of triples n0.., rows [t, 2t) are [u; i-], then the forward.
template <typename T, int kBytes>
S2META_ALWAYS_INLINE void forward_chunk(const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0,
                                        int64_t t, const T* const* wt, T* const* act) {
  const int64_t d = e.dim, width = 2 * d;
  for (int64_t n = 0; n < t; ++n) {
    const T* u = e.user + s * e.s_stride[0] + (n0 + n) * e.n_stride[0];
    const T* p = e.pos + s * e.s_stride[1] + (n0 + n) * e.n_stride[1];
    const T* q = e.neg + s * e.s_stride[2] + (n0 + n) * e.n_stride[2];
    T* pos_row = act[0] + n * width;
    T* neg_row = act[0] + (t + n) * width;
    std::copy(u, u + d, pos_row);
    std::copy(p, p + d, pos_row + d);
    std::copy(u, u + d, neg_row);
    std::copy(q, q + d, neg_row + d);
  }
  cpu::mlp_forward_tile<T, kBytes>(mlp, s, wt, act, 2 * t, 0);
}

template <typename T, int kBytes>
S2META_ALWAYS_INLINE void forward_chunk_scores(const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0,
                                               int64_t t, const T* const* wt, T* const* act, T* pos_score,
                                               T* neg_score) {
  forward_chunk<T, kBytes>(mlp, e, s, n0, t, wt, act);
  const T* score = act[mlp.num_layers];
  for (int64_t n = 0; n < t; ++n) {
    pos_score[n] = score[n];
    neg_score[n] = score[t + n];
  }
}

template <typename T>
void forward_chunk_base(const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0, int64_t t,
                        const T* const* wt, T* const* act, T* pos_score, T* neg_score) {
  forward_chunk_scores<T, 16>(mlp, e, s, n0, t, wt, act, pos_score, neg_score);
}

template <typename T>
S2META_TARGET_AVX2 void forward_chunk_avx2(const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0,
                                           int64_t t, const T* const* wt, T* const* act, T* pos_score,
                                           T* neg_score) {
  forward_chunk_scores<T, 32>(mlp, e, s, n0, t, wt, act, pos_score, neg_score);
}

template <typename T>
S2META_TARGET_AVX512 void forward_chunk_avx512(const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0,
                                               int64_t t, const T* const* wt, T* const* act, T* pos_score,
                                               T* neg_score) {
  forward_chunk_scores<T, 64>(mlp, e, s, n0, t, wt, act, pos_score, neg_score);
}

template <typename T>
void forward_chunk_any(int bytes, const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0, int64_t t,
                       const T* const* wt, T* const* act, T* pos_score, T* neg_score) {
  if (bytes == 64) {
    forward_chunk_avx512(mlp, e, s, n0, t, wt, act, pos_score, neg_score);
  } else if (bytes == 32) {
    forward_chunk_avx2(mlp, e, s, n0, t, wt, act, pos_score, neg_score);
  } else {
    forward_chunk_base(mlp, e, s, n0, t, wt, act, pos_score, neg_score);
  }
}

// Everything the backward of one chunk needs besides the tile.
template <typename T>
struct BackwardChunk {
  T margin;
  T d_loss_over_n;   // d_loss[s] / max(N, 1)
  const T* d_pos;    // d_pos_score of triple n0
  const T* d_neg;
  T* grad;           // the slot's partial: per layer [out, in] weights then [out] bias
  const int64_t* w_offset;
  const int64_t* b_offset;
  T* d_user;         // rows of triple n0 in the embedding gradients, or null
  T* d_pos_emb;
  T* d_neg_emb;
  T* pos_score;      // scores of triple n0, or null when the caller does not want them
  T* neg_score;
};

template <typename T, int kBytes>
S2META_ALWAYS_INLINE void backward_chunk(const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0,
                                         int64_t t, const T* const* wt, T* const* act, T* const* delta,
                                         const BackwardChunk<T>& c) {
  forward_chunk<T, kBytes>(mlp, e, s, n0, t, wt, act);
  const int last = mlp.num_layers - 1;
  const int64_t rows = 2 * t;
  const T* score = act[last + 1];
  int cur = 0;
  if (c.pos_score != nullptr) {
    for (int64_t n = 0; n < t; ++n) {
      c.pos_score[n] = score[n];
      c.neg_score[n] = score[t + n];
    }
  }
  for (int64_t n = 0; n < t; ++n) {
    const T slope = hinge_slope(c.margin, score[n], score[t + n], c.d_loss_over_n);
    delta[cur][n] = c.d_pos[n] - slope;
    delta[cur][t + n] = c.d_neg[n] + slope;
  }
  const bool emb_grad = c.d_user != nullptr;
  for (int l = last; l >= 0; --l) {
    const int64_t in = mlp.in[l], out = mlp.out[l];
    const T* dz = delta[cur];
    const T* x = act[l];
    // dW += dz^T x: dz read transposed through its strides.
    cpu::gemm_tile<T, kBytes, true>(c.grad + c.w_offset[l], in, dz, 1, out, x, in, out, rows, in);
    T* db = c.grad + c.b_offset[l];
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < out; ++o) db[o] += dz[r * out + o];
    if (l == 0 && !emb_grad) break;
    T* dx = delta[1 - cur];
    cpu::gemm_tile<T, kBytes, false>(dx, in, dz, out, 1, mlp.w[l] + s * mlp.w_stride[l], in, rows, out, in);
    if (l > 0) {
      // ReLU backward: x is the ReLU's output, so x <= 0 is exactly where it blocked.
      for (int64_t i = 0; i < rows * in; ++i) dx[i] = x[i] <= T(0) ? T(0) : dx[i];
    }
    cur = 1 - cur;
  }
  if (!emb_grad) return;
  const T* dx = delta[cur];
  const int64_t d = e.dim, width = 2 * d;
  for (int64_t n = 0; n < t; ++n) {
    const T* dp = dx + n * width;
    const T* dq = dx + (t + n) * width;
    T* du = c.d_user + n * d;
    for (int64_t j = 0; j < d; ++j) du[j] = dp[j] + dq[j];
    std::copy(dp + d, dp + width, c.d_pos_emb + n * d);
    std::copy(dq + d, dq + width, c.d_neg_emb + n * d);
  }
}

template <typename T>
void backward_chunk_base(const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0, int64_t t,
                         const T* const* wt, T* const* act, T* const* delta, const BackwardChunk<T>& c) {
  backward_chunk<T, 16>(mlp, e, s, n0, t, wt, act, delta, c);
}

template <typename T>
S2META_TARGET_AVX2 void backward_chunk_avx2(const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0,
                                            int64_t t, const T* const* wt, T* const* act, T* const* delta,
                                            const BackwardChunk<T>& c) {
  backward_chunk<T, 32>(mlp, e, s, n0, t, wt, act, delta, c);
}

template <typename T>
S2META_TARGET_AVX512 void backward_chunk_avx512(const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0,
                                                int64_t t, const T* const* wt, T* const* act, T* const* delta,
                                                const BackwardChunk<T>& c) {
  backward_chunk<T, 64>(mlp, e, s, n0, t, wt, act, delta, c);
}

template <typename T>
void backward_chunk_any(int bytes, const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0, int64_t t,
                        const T* const* wt, T* const* act, T* const* delta, const BackwardChunk<T>& c) {
  if (bytes == 64) {
    backward_chunk_avx512(mlp, e, s, n0, t, wt, act, delta, c);
  } else if (bytes == 32) {
    backward_chunk_avx2(mlp, e, s, n0, t, wt, act, delta, c);
  } else {
    backward_chunk_base(mlp, e, s, n0, t, wt, act, delta, c);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hinge_score_cpu(const at::Tensor& user_emb, const at::Tensor& pos_emb,
                                                               const at::Tensor& neg_emb, at::TensorList weights,
                                                               at::TensorList biases, double margin) {
  const HingeInputs in = prepare_hinge("hinge_score", user_emb, pos_emb, neg_emb, weights, biases);
  const int64_t S = in.mlp.scenarios, N = in.batch;
  at::Tensor pos_score = at::empty({S, N}, user_emb.options());
  at::Tensor neg_score = at::empty({S, N}, user_emb.options());
  at::Tensor loss = at::empty({S}, user_emb.options());
  AT_DISPATCH_FLOATING_TYPES(user_emb.scalar_type(), "hinge_score_cpu", [&] {
    using T = scalar_t;
    const MlpView<T> view = in.mlp.view<T>();
    const Embeddings<T> emb = embeddings_of<T>(in);
    const int64_t chunks = (N + kTriples - 1) / kTriples;
    T* ps = pos_score.mutable_data_ptr<T>();
    T* ns = neg_score.mutable_data_ptr<T>();
    if (chunks > 0) {
      const at::Tensor wt = cpu::transposed_weights<T>(in.mlp, view, user_emb);
      const int bytes = cpu::vector_bytes(cpu::isa());
      at::parallel_for(0, S * chunks, 1, [&](int64_t begin, int64_t end) {
        Tile<T> tile(in.mlp, 2 * kTriples);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t s = task / chunks, n0 = (task % chunks) * kTriples;
          const int64_t t = std::min(kTriples, N - n0);
          tile.point_at_scenario(in.mlp, wt.const_data_ptr<T>(), s);
          T* p = ps + s * N + n0;
          T* q = ns + s * N + n0;
          forward_chunk_any(bytes, view, emb, s, n0, t, tile.wt, tile.act, p, q);
        }
      });
    }
    // Serial, in triple order: the loss is bit-for-bit independent of the thread count.
    T* l = loss.mutable_data_ptr<T>();
    const T m = static_cast<T>(margin);
    for (int64_t s = 0; s < S; ++s) {
      T sum = 0;
      for (int64_t n = 0; n < N; ++n) sum += hinge_value(m, ps[s * N + n], ns[s * N + n]);
      l[s] = sum / static_cast<T>(std::max<int64_t>(N, 1));
    }
  });
  drop_scenario_dim(in.mlp.batched, {&loss, &pos_score, &neg_score});
  return {loss, pos_score, neg_score};
}

using Grads = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>;

// The fused backward; with pos_score/neg_score given ([S, N]) it also writes the forward's scores.
Grads backward_impl(const HingeInputs& in, const at::Tensor& user_emb, const at::Tensor& g_loss,
                    const at::Tensor& g_pos, const at::Tensor& g_neg, double margin, bool emb_grad,
                    at::Tensor* pos_score, at::Tensor* neg_score) {
  const MlpArgs& mlp = in.mlp;
  const int64_t S = mlp.scenarios, N = in.batch, d = mlp.dim, L = mlp.num_layers();

  std::vector<at::Tensor> d_weights, d_biases;
  std::vector<int64_t> w_offset(L), b_offset(L);
  int64_t offset = 0;
  for (int l = 0; l < L; ++l) {
    d_weights.push_back(at::empty({S, mlp.out(l), mlp.in(l)}, user_emb.options()));
    d_biases.push_back(at::empty({S, mlp.out(l)}, user_emb.options()));
    w_offset[l] = offset;
    offset += mlp.out(l) * mlp.in(l);
    b_offset[l] = offset;
    offset += mlp.out(l);
  }
  const at::TensorOptions opts = user_emb.options();
  at::Tensor d_user = emb_grad ? at::empty({S, N, d}, opts) : at::empty({0}, opts);
  at::Tensor d_pos = emb_grad ? at::empty({S, N, d}, opts) : at::empty({0}, opts);
  at::Tensor d_neg = emb_grad ? at::empty({S, N, d}, opts) : at::empty({0}, opts);

  const int64_t chunks = (N + kTriples - 1) / kTriples;
  const int64_t wanted = std::min((chunks + kMinChunksPerSlot - 1) / kMinChunksPerSlot,
                                  std::max<int64_t>(1, kMaxSlotsPerCall / std::max<int64_t>(S, 1)));
  const int64_t per_slot = wanted > 0 ? (chunks + wanted - 1) / wanted : 0;
  const int64_t slots = per_slot > 0 ? (chunks + per_slot - 1) / per_slot : 0;
  // Each slot zeroes its own partial (first touch by the thread that fills it); an empty batch
  // has one zero partial per scenario.
  at::Tensor partial = slots > 0 ? at::empty({S, slots, mlp.num_params}, opts) : at::zeros({S, 1, mlp.num_params}, opts);

  AT_DISPATCH_FLOATING_TYPES(user_emb.scalar_type(), "hinge_score_backward_cpu", [&] {
    using T = scalar_t;
    const MlpView<T> view = mlp.view<T>();
    const Embeddings<T> emb = embeddings_of<T>(in);
    T* part = partial.mutable_data_ptr<T>();
    if (slots > 0) {
      const at::Tensor wt = cpu::transposed_weights<T>(mlp, view, user_emb);
      const int bytes = cpu::vector_bytes(cpu::isa());
      const T scale = T(1) / static_cast<T>(std::max<int64_t>(N, 1));
      at::parallel_for(0, S * slots, 1, [&](int64_t begin, int64_t end) {
        Tile<T> tile(mlp, 2 * kTriples);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t s = task / slots, slot = task % slots;
          tile.point_at_scenario(mlp, wt.const_data_ptr<T>(), s);
          BackwardChunk<T> c{};
          c.margin = static_cast<T>(margin);
          c.d_loss_over_n = g_loss.const_data_ptr<T>()[s] * scale;
          c.grad = part + task * mlp.num_params;
          std::fill(c.grad, c.grad + mlp.num_params, T(0));
          c.w_offset = w_offset.data();
          c.b_offset = b_offset.data();
          const int64_t last_chunk = std::min(chunks, (slot + 1) * per_slot);
          for (int64_t chunk = slot * per_slot; chunk < last_chunk; ++chunk) {
            const int64_t n0 = chunk * kTriples, t = std::min(kTriples, N - n0);
            c.d_pos = g_pos.const_data_ptr<T>() + s * N + n0;
            c.d_neg = g_neg.const_data_ptr<T>() + s * N + n0;
            if (pos_score != nullptr) {
              c.pos_score = pos_score->mutable_data_ptr<T>() + s * N + n0;
              c.neg_score = neg_score->mutable_data_ptr<T>() + s * N + n0;
            }
            if (emb_grad) {
              c.d_user = d_user.mutable_data_ptr<T>() + (s * N + n0) * d;
              c.d_pos_emb = d_pos.mutable_data_ptr<T>() + (s * N + n0) * d;
              c.d_neg_emb = d_neg.mutable_data_ptr<T>() + (s * N + n0) * d;
            }
            backward_chunk_any(bytes, view, emb, s, n0, t, tile.wt, tile.act, tile.delta, c);
          }
        }
      });
    }
    // Slots summed in a fixed order (determinism), straight into the per-layer outputs.
    const int64_t used = std::max<int64_t>(slots, 1);
    // A small sum runs on the calling thread: waking a parked worker can cost more than the sum.
    const int64_t grain = S * used * mlp.num_params < (int64_t(1) << 18) ? S * L : 1;
    at::parallel_for(0, S * L, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / L;
        const int l = static_cast<int>(task % L);
        const int64_t nw = mlp.out(l) * mlp.in(l), nb = mlp.out(l);
        T* dw = d_weights[l].mutable_data_ptr<T>() + s * nw;
        T* db = d_biases[l].mutable_data_ptr<T>() + s * nb;
        const T* src = part + s * used * mlp.num_params;
        std::copy(src + w_offset[l], src + w_offset[l] + nw, dw);
        std::copy(src + b_offset[l], src + b_offset[l] + nb, db);
        for (int64_t k = 1; k < used; ++k) {
          const T* sk = src + k * mlp.num_params;
          for (int64_t j = 0; j < nw; ++j) dw[j] += sk[w_offset[l] + j];
          for (int64_t j = 0; j < nb; ++j) db[j] += sk[b_offset[l] + j];
        }
      }
    });
  });
  drop_scenario_dim(mlp.batched, d_weights);
  drop_scenario_dim(mlp.batched, d_biases);
  if (emb_grad) drop_scenario_dim(mlp.batched, {&d_user, &d_pos, &d_neg});
  return {d_weights, d_biases, d_user, d_pos, d_neg};
}

Grads hinge_score_backward_cpu(const at::Tensor& d_loss, const at::Tensor& d_pos_score, const at::Tensor& d_neg_score,
                               const at::Tensor& user_emb, const at::Tensor& pos_emb, const at::Tensor& neg_emb,
                               at::TensorList weights, at::TensorList biases, double margin, bool emb_grad) {
  const char* op = "hinge_score_backward";
  const HingeInputs in = prepare_hinge(op, user_emb, pos_emb, neg_emb, weights, biases);
  check_hinge_grads(op, in, user_emb, d_loss, d_pos_score, d_neg_score);
  return backward_impl(in, user_emb, d_loss.contiguous(), d_pos_score.contiguous(), d_neg_score.contiguous(), margin,
                       emb_grad, nullptr, nullptr);
}

// Loss, scores and the loss's MLP gradient from the one fused pass of the backward (upstream:
// d_loss = 1, no score gradient): what a first-order inner loop needs per step.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> hinge_score_grad_cpu(
    const at::Tensor& user_emb, const at::Tensor& pos_emb, const at::Tensor& neg_emb, at::TensorList weights,
    at::TensorList biases, double margin) {
  const HingeInputs in = prepare_hinge("hinge_score_grad", user_emb, pos_emb, neg_emb, weights, biases);
  const int64_t S = in.mlp.scenarios, N = in.batch;
  const at::TensorOptions opts = user_emb.options();
  at::Tensor pos_score = at::empty({S, N}, opts), neg_score = at::empty({S, N}, opts);
  at::Tensor no_score_grad = at::zeros({S, N}, opts);
  Grads grads = backward_impl(in, user_emb, at::ones({S}, opts), no_score_grad, no_score_grad, margin, false,
                              &pos_score, &neg_score);
  at::Tensor loss = at::empty({S}, opts);
  AT_DISPATCH_FLOATING_TYPES(user_emb.scalar_type(), "hinge_score_grad_cpu", [&] {
    using T = scalar_t;
    const T* ps = pos_score.const_data_ptr<T>();
    const T* ns = neg_score.const_data_ptr<T>();
    T* l = loss.mutable_data_ptr<T>();
    const T m = static_cast<T>(margin);
    for (int64_t s = 0; s < S; ++s) {  // serial and in order, exactly as hinge_score's loss
      T sum = 0;
      for (int64_t n = 0; n < N; ++n) sum += hinge_value(m, ps[s * N + n], ns[s * N + n]);
      l[s] = sum / static_cast<T>(std::max<int64_t>(N, 1));
    }
  });
  drop_scenario_dim(in.mlp.batched, {&loss, &pos_score, &neg_score});
  return {loss, pos_score, neg_score, std::get<0>(grads), std::get<1>(grads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2meta, CPU, m) {
  m.impl("hinge_score", &hinge_score_cpu);
  m.impl("hinge_score_backward", &hinge_score_backward_cpu);
  m.impl("hinge_score_grad", &hinge_score_grad_cpu);
}

}  // namespace s2meta
