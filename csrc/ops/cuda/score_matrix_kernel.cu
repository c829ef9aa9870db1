// score_matrix on the GPU: out[s, a, b] = f(user_emb[s, a], item_emb[s, b]) for every pair.
//
// Kernel 1 computes the split first layer once per row, U = user_emb W1u^T + b1 and
// V = item_emb W1i^T (A + B matvecs per scenario instead of A * B). Kernel 2 gives one block a
// user row and a strip of item columns: it starts from relu(U[a] + V[b]) and pushes the strip
// through the remaining layers, staged in shared memory when they fit (mlp_block.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "ops/cuda/mlp_block.cuh"
#include "ops/score_matrix.h"

namespace s2meta {
namespace {

constexpr int kMaxPairs = 64;

template <typename T>
struct Sides {
  const T* users;
  const T* items;
  int64_t user_s_stride, user_n_stride, item_s_stride, item_n_stride;
};

// uv[s, r, j] for r < A: users[s, r] . W1[j, :d] + b1[j]; for r >= A: items[s, r - A] . W1[j, d:].
template <typename T>
__global__ void first_layer_kernel(const T* w0, int64_t w0_stride, const T* b0, int64_t b0_stride, Sides<T> e,
                                   int64_t A, int64_t B, int d, int h1, int64_t total, T* uv) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int j = static_cast<int>(idx % h1);
    const int64_t r = (idx / h1) % (A + B), s = idx / (h1 * (A + B));
    const bool user = r < A;
    const T* x = user ? e.users + s * e.user_s_stride + r * e.user_n_stride
                      : e.items + s * e.item_s_stride + (r - A) * e.item_n_stride;
    const T* w = w0 + s * w0_stride + static_cast<int64_t>(j) * 2 * d + (user ? 0 : d);
    T sum = user ? b0[s * b0_stride + j] : T(0);
    for (int k = 0; k < d; ++k) sum += x[k] * w[k];
    uv[idx] = sum;
  }
}

// `rest` is the MLP without its first layer; with no layers left the score is U[a] + V[b].
template <typename T>
__global__ void __launch_bounds__(cuda::kThreads)
    pair_kernel(MlpView<T> rest, const T* uv, int64_t A, int64_t B, int64_t col_blocks, int pairs, int h1,
                bool shared_weights, int64_t rest_params, T* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t s = blockIdx.y, a = blockIdx.x / col_blocks, c0 = (blockIdx.x % col_blocks) * pairs;
  const int cols = static_cast<int>(B - c0 < pairs ? B - c0 : pairs);
  const T* u = uv + (s * (A + B) + a) * h1;
  const T* v = uv + (s * (A + B) + A + c0) * h1;
  T* o = out + (s * A + a) * B + c0;
  if (rest.num_layers == 0) {
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = u[0] + v[c];
    return;
  }
  const T* w[kMaxLayers];
  const T* b[kMaxLayers];
  cuda::stage_weights(rest, s, shared_weights, smem, w, b);
  T* act[kMaxLayers + 1];
  int ld[kMaxLayers + 1];
  cuda::carve_tiles(rest, smem + (shared_weights ? rest_params : 0), pairs, act, ld);
  for (int idx = threadIdx.x; idx < cols * h1; idx += blockDim.x) {
    const int c = idx / h1, j = idx % h1;
    const T z = u[j] + v[c * h1 + j];
    act[0][c * ld[0] + j] = z < T(0) ? T(0) : z;
  }
  __syncthreads();
  const int last = rest.num_layers - 1;
  for (int l = 0; l <= last; ++l) {
    cuda::layer_forward(act[l], ld[l], act[l + 1], ld[l + 1], w[l], b[l], cols, static_cast<int>(rest.in[l]),
                        static_cast<int>(rest.out[l]), l < last);
    __syncthreads();
  }
  for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = act[last + 1][c * ld[last + 1]];
}

at::Tensor score_matrix_cuda(const at::Tensor& user_emb, const at::Tensor& item_emb, at::TensorList weights,
                             at::TensorList biases) {
  const c10::cuda::CUDAGuard guard(user_emb.device());
  const ScoreMatrixInputs in = prepare_score_matrix("score_matrix", user_emb, item_emb, weights, biases);
  const MlpArgs& mlp = in.mlp;
  const int64_t S = mlp.scenarios, A = in.users.size(1), B = in.items.size(1), h1 = mlp.out(0);
  at::Tensor out = at::empty({S, A, B}, user_emb.options());
  if (S * A * B > 0) {
    TORCH_CHECK(S <= 65535, "score_matrix: at most 65535 scenarios per call on CUDA, got S = ", S);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(user_emb.scalar_type(), "score_matrix_cuda", [&] {
      using T = scalar_t;
      const MlpView<T> view = mlp.view<T>();
      at::Tensor uv = at::empty({S, A + B, h1}, user_emb.options());
      Sides<T> e{in.users.const_data_ptr<T>(), in.items.const_data_ptr<T>(), in.users.stride(0), in.users.stride(1),
                 in.items.stride(0), in.items.stride(1)};
      const int64_t total = S * (A + B) * h1;
      const int grid1 = static_cast<int>(std::min<int64_t>((total + cuda::kThreads - 1) / cuda::kThreads, 65535));
      first_layer_kernel<T><<<grid1, cuda::kThreads, 0, stream>>>(view.w[0], view.w_stride[0], view.b[0],
                                                                  view.b_stride[0], e, A, B, static_cast<int>(mlp.dim),
                                                                  static_cast<int>(h1), total, uv.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      MlpView<T> rest{};
      rest.num_layers = view.num_layers - 1;
      int64_t rest_params = 0;
      for (int l = 1; l < view.num_layers; ++l) {
        rest.in[l - 1] = view.in[l];
        rest.out[l - 1] = view.out[l];
        rest.w[l - 1] = view.w[l];
        rest.b[l - 1] = view.b[l];
        rest.w_stride[l - 1] = view.w_stride[l];
        rest.b_stride[l - 1] = view.b_stride[l];
        rest_params += view.in[l] * view.out[l] + view.out[l];
      }
      // The widest strip whose tiles fit next to the staged weights, else beside global weights.
      int pairs = kMaxPairs;
      bool shared_weights = false;
      size_t bytes = 0;
      if (rest.num_layers > 0) {
        const size_t limit = cuda::max_shared_bytes();
        bool found = false;
        for (int pass = 0; pass < 2 && !found; ++pass) {
          for (int p = kMaxPairs; p >= 1 && !found; p /= 2) {
            const size_t need = (cuda::tile_elements(rest, p) + (pass == 0 ? rest_params : 0)) * sizeof(T);
            if (need <= limit) {
              pairs = p;
              shared_weights = pass == 0;
              bytes = need;
              found = true;
            }
          }
        }
        TORCH_CHECK(found, "score_matrix: layers up to ", mlp.max_width, " wide do not fit a CUDA block's ", limit,
                    " bytes of shared memory");
        cuda::allow_shared_bytes(pair_kernel<T>, bytes);
      }
      const int64_t col_blocks = (B + pairs - 1) / pairs;
      TORCH_CHECK(col_blocks * A < (int64_t(1) << 31), "score_matrix: A * B too large for one CUDA launch");
      pair_kernel<T><<<dim3(static_cast<unsigned>(col_blocks * A), static_cast<unsigned>(S)), cuda::kThreads, bytes,
                       stream>>>(rest, uv.const_data_ptr<T>(), A, B, col_blocks, pairs, static_cast<int>(h1),
                                 shared_weights, rest_params, out.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return mlp.batched ? out : out.squeeze(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(s2meta, CUDA, m) { m.impl("score_matrix", &score_matrix_cuda); }

}  // namespace s2meta
