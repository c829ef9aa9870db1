// hinge_score and its fused backward on the GPU (the math is in ops/hinge_score.h).
//
// One block per (chunk of triples, scenario): the block stages its scenario's MLP in shared
// memory when it fits (else reads it from global memory), lays its chunk's positives and
// negatives out as rows of one tile and pushes the tile through the layers (mlp_block.cuh).
// The backward block loops over a fixed, strided set of chunks, recomputes the forward, applies
// the hinge and back-propagates, owning one partial gradient of the whole MLP; a second kernel
// sums the partials in block order. No atomics and no host synchronisation: the result is
// deterministic and the ops can be captured in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common.h"
#include "ops/cuda/mlp_block.cuh"
#include "ops/hinge_score.h"

namespace s2meta {
namespace {

constexpr int kMaxTriples = 16;
// Blocks per scenario in the backward; each owns a partial of the whole MLP's gradient.
constexpr int64_t kMaxBackwardBlocks = 256;

template <typename T>
struct Embeddings {
  const T* ptr[3];  // user, pos, neg
  int64_t s_stride[3];
  int64_t n_stride[3];
  int dim;
};

template <typename T>
Embeddings<T> embeddings_of(const HingeInputs& in) {
  const at::Tensor* e[3] = {&in.user, &in.pos, &in.neg};
  Embeddings<T> v{};
  for (int k = 0; k < 3; ++k) {
    v.ptr[k] = e[k]->const_data_ptr<T>();
    v.s_stride[k] = e[k]->stride(0);
    v.n_stride[k] = e[k]->stride(1);
  }
  v.dim = static_cast<int>(in.mlp.dim);
  return v;
}

// Where each layer's rows and gradients live in the block's shared memory.
struct Plan {
  int triples = 0;            // triples per chunk (the tile holds twice as many rows)
  bool shared_weights = false;
  size_t bytes = 0;
};

template <typename T>
size_t tile_elements(const MlpView<T>& mlp, int rows, bool backward, int64_t max_width) {
  const size_t gradients = backward ? 2 * static_cast<size_t>(rows) * cuda::padded(max_width) : 0;
  return cuda::tile_elements(mlp, rows) + gradients;
}

// The largest chunk (up to kMaxTriples) that lets the weights join the tile in shared memory;
// failing that, the largest tile that fits alone, with the weights read from global memory.
// d = 128 in float32 keeps its weights in shared memory with 8 triples per chunk in the forward
// and 4 in the backward (whose two gradient buffers take the room).
template <typename T>
Plan plan_for(const MlpArgs& args, const MlpView<T>& mlp, bool backward, const char* op) {
  const size_t limit = cuda::max_shared_bytes();
  const size_t weights = static_cast<size_t>(args.num_params) * sizeof(T);
  Plan plan;
  for (int pass = 0; pass < 2; ++pass) {
    const bool shared = pass == 0;
    for (int t = kMaxTriples; t >= 1; t /= 2) {
      const size_t bytes = tile_elements(mlp, 2 * t, backward, args.max_width) * sizeof(T) + (shared ? weights : 0);
      if (bytes <= limit) {
        plan.triples = t;
        plan.shared_weights = shared;
        plan.bytes = bytes;
        return plan;
      }
    }
  }
  TORCH_CHECK(false, op, ": layers up to ", args.max_width, " wide do not fit a CUDA block's ", limit,
              " bytes of shared memory even for one triple");
  return plan;
}

// Carves the activation tiles and, for the backward, two gradient buffers out of `p`.
template <typename T>
__device__ void carve(const MlpView<T>& mlp, T* p, int rows, int max_width, T** act, int* ld, T** delta) {
  p = cuda::carve_tiles(mlp, p, rows, act, ld);
  if (delta != nullptr) {
    delta[0] = p;
    delta[1] = p + rows * (max_width + 1);
  }
}

// Rows [0, t) are [u; i+], rows [t, 2t) are [u; i-]; then the forward through every layer.
template <typename T>
__device__ void forward_chunk(const MlpView<T>& mlp, const Embeddings<T>& e, int64_t s, int64_t n0, int t,
                              const T* const* w, const T* const* b, T* const* act, const int* ld) {
  const int d = e.dim, width = 2 * d;
  for (int idx = threadIdx.x; idx < 2 * t * width; idx += blockDim.x) {
    const int r = idx / width, j = idx % width;
    const int n = r < t ? r : r - t;
    const int k = j < d ? 0 : (r < t ? 1 : 2);
    act[0][r * ld[0] + j] = e.ptr[k][s * e.s_stride[k] + (n0 + n) * e.n_stride[k] + (j < d ? j : j - d)];
  }
  __syncthreads();
  const int last = mlp.num_layers - 1;
  for (int l = 0; l <= last; ++l) {
    cuda::layer_forward(act[l], ld[l], act[l + 1], ld[l + 1], w[l], b[l], 2 * t, static_cast<int>(mlp.in[l]),
                        static_cast<int>(mlp.out[l]), l < last);
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    hinge_forward_kernel(MlpView<T> mlp, Embeddings<T> e, int64_t n_triples, int triples, bool shared_weights,
                         int64_t num_params, int max_width, T* pos_score, T* neg_score) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t s = blockIdx.y, n0 = static_cast<int64_t>(blockIdx.x) * triples;
  const int t = static_cast<int>(n_triples - n0 < triples ? n_triples - n0 : triples);
  const T* w[kMaxLayers];
  const T* b[kMaxLayers];
  cuda::stage_weights(mlp, s, shared_weights, smem, w, b);
  T* act[kMaxLayers + 1];
  int ld[kMaxLayers + 1];
  carve<T>(mlp, smem + (shared_weights ? num_params : 0), 2 * triples, max_width, act, ld, nullptr);
  forward_chunk(mlp, e, s, n0, t, w, b, act, ld);
  const T* score = act[mlp.num_layers];
  const int lds = ld[mlp.num_layers];
  for (int n = threadIdx.x; n < t; n += blockDim.x) {
    pos_score[s * n_triples + n0 + n] = score[n * lds];
    neg_score[s * n_triples + n0 + n] = score[(t + n) * lds];
  }
}

// Fixed-order tree sum per scenario: the loss does not depend on scheduling.
template <typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    hinge_loss_kernel(const T* pos_score, const T* neg_score, int64_t n_triples, T margin, T* loss) {
  __shared__ T partial[cuda::kThreads];
  const int64_t s = blockIdx.x;
  T sum = 0;
  for (int64_t n = threadIdx.x; n < n_triples; n += blockDim.x)
    sum += hinge_value(margin, pos_score[s * n_triples + n], neg_score[s * n_triples + n]);
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss[s] = partial[0] / static_cast<T>(n_triples > 0 ? n_triples : 1);
}

template <typename T>
struct Upstream {
  const T* d_loss;  // [S], or null for d_loss = 1
  const T* d_pos;   // [S, N], or null (with d_neg) for no score gradient
  const T* d_neg;
  T margin;
  T inv_count;      // 1 / max(N, 1)
  T* d_user;        // [S, N, d] each, or null when the embedding gradients are not wanted
  T* d_pos_emb;
  T* d_neg_emb;
  T* pos_score;     // [S, N] each, or null when the caller does not want the scores
  T* neg_score;
};

template <typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    hinge_backward_kernel(MlpView<T> mlp, Embeddings<T> e, Upstream<T> up, int64_t n_triples, int triples,
                          int64_t chunks, bool shared_weights, int64_t num_params, int max_width, T* partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t s = blockIdx.y, blocks = gridDim.x;
  const T* w[kMaxLayers];
  const T* b[kMaxLayers];
  cuda::stage_weights(mlp, s, shared_weights, smem, w, b);
  T* act[kMaxLayers + 1];
  int ld[kMaxLayers + 1];
  T* delta[2];
  carve<T>(mlp, smem + (shared_weights ? num_params : 0), 2 * triples, max_width, act, ld, delta);
  T* grad = partial + (s * blocks + blockIdx.x) * num_params;
  const int last = mlp.num_layers - 1, d = e.dim;
  const int lddelta = max_width + 1;
  const T g_loss = (up.d_loss != nullptr ? up.d_loss[s] : T(1)) * up.inv_count;
  bool accumulate = false;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += blocks) {
    const int64_t n0 = chunk * triples;
    const int t = static_cast<int>(n_triples - n0 < triples ? n_triples - n0 : triples), rows = 2 * t;
    forward_chunk(mlp, e, s, n0, t, w, b, act, ld);
    const T* score = act[last + 1];
    for (int n = threadIdx.x; n < t; n += blockDim.x) {
      const T pos = score[n * ld[last + 1]], neg = score[(t + n) * ld[last + 1]];
      const int64_t o = s * n_triples + n0 + n;
      const T slope = hinge_slope(up.margin, pos, neg, g_loss);
      delta[0][n * lddelta] = (up.d_pos != nullptr ? up.d_pos[o] : T(0)) - slope;
      delta[0][(t + n) * lddelta] = (up.d_neg != nullptr ? up.d_neg[o] : T(0)) + slope;
      if (up.pos_score != nullptr) {
        up.pos_score[o] = pos;
        up.neg_score[o] = neg;
      }
    }
    __syncthreads();
    int cur = 0;
    int64_t offset = 0;
    int64_t w_offset[kMaxLayers];
    for (int l = 0; l <= last; ++l) {
      w_offset[l] = offset;
      offset += mlp.in[l] * mlp.out[l] + mlp.out[l];
    }
    for (int l = last; l >= 0; --l) {
      const int in = static_cast<int>(mlp.in[l]), out = static_cast<int>(mlp.out[l]);
      T* dw = grad + w_offset[l];
      cuda::layer_weight_grad(delta[cur], lddelta, act[l], ld[l], dw, dw + in * out, rows, in, out, accumulate);
      if (l == 0 && up.d_user == nullptr) break;
      cuda::layer_input_grad(delta[cur], lddelta, w[l], act[l], ld[l], delta[1 - cur], lddelta, rows, in, out, l > 0);
      __syncthreads();
      cur = 1 - cur;
    }
    if (up.d_user != nullptr) {
      const T* dx = delta[cur];
      for (int idx = threadIdx.x; idx < t * d; idx += blockDim.x) {
        const int n = idx / d, j = idx % d;
        const int64_t o = (s * n_triples + n0 + n) * d + j;
        up.d_user[o] = dx[n * lddelta + j] + dx[(t + n) * lddelta + j];
        up.d_pos_emb[o] = dx[n * lddelta + d + j];
        up.d_neg_emb[o] = dx[(t + n) * lddelta + d + j];
      }
    }
    __syncthreads();
    accumulate = true;
  }
}

template <typename T>
struct GradOut {
  T* dw[kMaxLayers];
  T* db[kMaxLayers];
  int64_t w_offset[kMaxLayers];  // of layer l's weights inside a partial; its bias follows them
  int64_t nw[kMaxLayers];
  int64_t nb[kMaxLayers];
  int num_layers;
};

// out[s][j] = sum over blocks k, in order, of partial[s][k][j], scattered to the layer tensors.
template <typename T>
__global__ void reduce_partials_kernel(const T* partial, int64_t blocks, int64_t num_params, int64_t total,
                                       GradOut<T> out) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t s = idx / num_params, j = idx % num_params;
    const T* p = partial + s * blocks * num_params + j;
    T sum = 0;
    for (int64_t k = 0; k < blocks; ++k) sum += p[k * num_params];
    for (int l = 0; l < out.num_layers; ++l) {
      const int64_t rel = j - out.w_offset[l];
      if (rel < out.nw[l]) {
        out.dw[l][s * out.nw[l] + rel] = sum;
        break;
      }
      if (rel < out.nw[l] + out.nb[l]) {
        out.db[l][s * out.nb[l] + rel - out.nw[l]] = sum;
        break;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hinge_score_cuda(const at::Tensor& user_emb, const at::Tensor& pos_emb,
                                                                const at::Tensor& neg_emb, at::TensorList weights,
                                                                at::TensorList biases, double margin) {
  const c10::cuda::CUDAGuard guard(user_emb.device());
  const HingeInputs in = prepare_hinge("hinge_score", user_emb, pos_emb, neg_emb, weights, biases);
  const int64_t S = in.mlp.scenarios, N = in.batch;
  at::Tensor pos_score = at::empty({S, N}, user_emb.options());
  at::Tensor neg_score = at::empty({S, N}, user_emb.options());
  // The loss kernel writes every entry; only an empty batch needs the zeros spelled out.
  at::Tensor loss = N > 0 ? at::empty({S}, user_emb.options()) : at::zeros({S}, user_emb.options());
  if (S > 0 && N > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(user_emb.scalar_type(), "hinge_score_cuda", [&] {
      using T = scalar_t;
      const MlpView<T> view = in.mlp.view<T>();
      const Plan plan = plan_for<T>(in.mlp, view, false, "hinge_score");
      const int64_t chunks = (N + plan.triples - 1) / plan.triples;
      TORCH_CHECK(S <= 65535, "hinge_score: at most 65535 scenarios per call on CUDA, got S = ", S);
      cuda::allow_shared_bytes(hinge_forward_kernel<T>, plan.bytes);
      hinge_forward_kernel<T><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(S)), cuda::kThreads,
                                plan.bytes, stream>>>(
          view, embeddings_of<T>(in), N, plan.triples, plan.shared_weights, in.mlp.num_params,
          static_cast<int>(in.mlp.max_width), pos_score.mutable_data_ptr<T>(), neg_score.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      hinge_loss_kernel<T><<<static_cast<unsigned>(S), cuda::kThreads, 0, stream>>>(
          pos_score.const_data_ptr<T>(), neg_score.const_data_ptr<T>(), N, static_cast<T>(margin),
          loss.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  drop_scenario_dim(in.mlp.batched, {&loss, &pos_score, &neg_score});
  return {loss, pos_score, neg_score};
}

using Grads = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>;

// The fused backward. Null upstream pointers mean d_loss = 1 and no score gradient; given
// pos_score/neg_score ([S, N]), it also writes the forward's scores.
Grads backward_impl(const HingeInputs& in, const at::Tensor& user_emb, const at::Tensor* d_loss,
                    const at::Tensor* d_pos_score, const at::Tensor* d_neg_score, double margin, bool emb_grad,
                    at::Tensor* pos_score, at::Tensor* neg_score) {
  const char* op = "hinge_score_backward";
  const MlpArgs& mlp = in.mlp;
  const int64_t S = mlp.scenarios, N = in.batch, d = mlp.dim;
  const int L = mlp.num_layers();
  const at::TensorOptions opts = user_emb.options();
  // The reduce kernel writes every entry; only an empty batch needs the zeros spelled out.
  const bool empty_batch = S == 0 || N == 0;
  std::vector<at::Tensor> d_weights, d_biases;
  for (int l = 0; l < L; ++l) {
    d_weights.push_back(empty_batch ? at::zeros({S, mlp.out(l), mlp.in(l)}, opts)
                                    : at::empty({S, mlp.out(l), mlp.in(l)}, opts));
    d_biases.push_back(empty_batch ? at::zeros({S, mlp.out(l)}, opts) : at::empty({S, mlp.out(l)}, opts));
  }
  at::Tensor d_user = emb_grad ? at::empty({S, N, d}, opts) : at::empty({0}, opts);
  at::Tensor d_pos = emb_grad ? at::empty({S, N, d}, opts) : at::empty({0}, opts);
  at::Tensor d_neg = emb_grad ? at::empty({S, N, d}, opts) : at::empty({0}, opts);
  if (!empty_batch) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(user_emb.scalar_type(), "hinge_score_backward_cuda", [&] {
      using T = scalar_t;
      const MlpView<T> view = mlp.view<T>();
      const Plan plan = plan_for<T>(mlp, view, true, op);
      const int64_t chunks = (N + plan.triples - 1) / plan.triples;
      const int64_t blocks = std::min(chunks, std::max<int64_t>(1, kMaxBackwardBlocks / S));
      TORCH_CHECK(S <= 65535, op, ": at most 65535 scenarios per call on CUDA, got S = ", S);
      at::Tensor partial = at::empty({S, blocks, mlp.num_params}, opts);
      Upstream<T> up{};
      if (d_loss != nullptr) {
        up.d_loss = d_loss->const_data_ptr<T>();
        up.d_pos = d_pos_score->const_data_ptr<T>();
        up.d_neg = d_neg_score->const_data_ptr<T>();
      }
      up.margin = static_cast<T>(margin);
      up.inv_count = T(1) / static_cast<T>(std::max<int64_t>(N, 1));
      if (emb_grad) {
        up.d_user = d_user.mutable_data_ptr<T>();
        up.d_pos_emb = d_pos.mutable_data_ptr<T>();
        up.d_neg_emb = d_neg.mutable_data_ptr<T>();
      }
      if (pos_score != nullptr) {
        up.pos_score = pos_score->mutable_data_ptr<T>();
        up.neg_score = neg_score->mutable_data_ptr<T>();
      }
      cuda::allow_shared_bytes(hinge_backward_kernel<T>, plan.bytes);
      hinge_backward_kernel<T><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(S)), cuda::kThreads,
                                 plan.bytes, stream>>>(view, embeddings_of<T>(in), up, N, plan.triples, chunks,
                                                       plan.shared_weights, mlp.num_params,
                                                       static_cast<int>(mlp.max_width), partial.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      GradOut<T> out{};
      out.num_layers = L;
      int64_t offset = 0;
      for (int l = 0; l < L; ++l) {
        out.dw[l] = d_weights[l].mutable_data_ptr<T>();
        out.db[l] = d_biases[l].mutable_data_ptr<T>();
        out.w_offset[l] = offset;
        out.nw[l] = mlp.out(l) * mlp.in(l);
        out.nb[l] = mlp.out(l);
        offset += out.nw[l] + out.nb[l];
      }
      const int64_t total = S * mlp.num_params;
      const int grid = static_cast<int>(std::min<int64_t>((total + cuda::kThreads - 1) / cuda::kThreads, 65535));
      reduce_partials_kernel<T><<<grid, cuda::kThreads, 0, stream>>>(partial.const_data_ptr<T>(), blocks,
                                                                      mlp.num_params, total, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  drop_scenario_dim(mlp.batched, d_weights);
  drop_scenario_dim(mlp.batched, d_biases);
  if (emb_grad) drop_scenario_dim(mlp.batched, {&d_user, &d_pos, &d_neg});
  return {d_weights, d_biases, d_user, d_pos, d_neg};
}

Grads hinge_score_backward_cuda(const at::Tensor& d_loss, const at::Tensor& d_pos_score, const at::Tensor& d_neg_score,
                                const at::Tensor& user_emb, const at::Tensor& pos_emb, const at::Tensor& neg_emb,
                                at::TensorList weights, at::TensorList biases, double margin, bool emb_grad) {
  const char* op = "hinge_score_backward";
  const c10::cuda::CUDAGuard guard(user_emb.device());
  const HingeInputs in = prepare_hinge(op, user_emb, pos_emb, neg_emb, weights, biases);
  check_hinge_grads(op, in, user_emb, d_loss, d_pos_score, d_neg_score);
  const at::Tensor g_loss = d_loss.contiguous(), g_pos = d_pos_score.contiguous(), g_neg = d_neg_score.contiguous();
  return backward_impl(in, user_emb, &g_loss, &g_pos, &g_neg, margin, emb_grad, nullptr, nullptr);
}

// Loss, scores and the loss's MLP gradient from the backward's one fused pass (see s2meta.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> hinge_score_grad_cuda(
    const at::Tensor& user_emb, const at::Tensor& pos_emb, const at::Tensor& neg_emb, at::TensorList weights,
    at::TensorList biases, double margin) {
  const c10::cuda::CUDAGuard guard(user_emb.device());
  const HingeInputs in = prepare_hinge("hinge_score_grad", user_emb, pos_emb, neg_emb, weights, biases);
  const int64_t S = in.mlp.scenarios, N = in.batch;
  const at::TensorOptions opts = user_emb.options();
  at::Tensor pos_score = at::empty({S, N}, opts), neg_score = at::empty({S, N}, opts);
  Grads grads = backward_impl(in, user_emb, nullptr, nullptr, nullptr, margin, false, &pos_score, &neg_score);
  at::Tensor loss = N > 0 ? at::empty({S}, opts) : at::zeros({S}, opts);
  if (S > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES(user_emb.scalar_type(), "hinge_score_grad_cuda", [&] {
      using T = scalar_t;
      hinge_loss_kernel<T><<<static_cast<unsigned>(S), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          pos_score.const_data_ptr<T>(), neg_score.const_data_ptr<T>(), N, static_cast<T>(margin),
          loss.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  drop_scenario_dim(in.mlp.batched, {&loss, &pos_score, &neg_score});
  return {loss, pos_score, neg_score, std::get<0>(grads), std::get<1>(grads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2meta, CUDA, m) {
  m.impl("hinge_score", &hinge_score_cuda);
  m.impl("hinge_score_backward", &hinge_score_backward_cuda);
  m.impl("hinge_score_grad", &hinge_score_grad_cuda);
}

}  // namespace s2meta
