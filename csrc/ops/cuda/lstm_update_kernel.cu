// lstm_update_multi on the GPU: the coordinatewise-LSTM step of docs/spec.md §3 (formula in
// ops/lstm_update.h) and its fused backward, one thread per coordinate.
//
// Each block serves one controller: the host assigns every segment its own range of blocks
// (offsets and block ranges travel by value in a fixed-size struct, so a launch needs no
// device copy and is CUDA-graph capturable) and the block keeps that controller's weights in
// shared memory. The backward stashes each tile's per-coordinate factors in shared memory,
// sums the weight-gradient outer products per block in a fixed order into its own row of a
// partials buffer, and a second kernel adds each controller's rows in block order: no float
// atomics, so the gradients are bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "common.h"
#include "ops/grad_preprocess.h"
#include "ops/lstm_update.h"

namespace s2meta {
namespace {

using lstm::Dims;
using lstm::kFeatures;
constexpr int kMaxK = lstm::kMaxControllersCuda;
constexpr int kForwardThreads = 128;
constexpr int kBackwardThreads = 64;
// Bounds the partials buffer (blocks x P values) and the reduce kernel's serial sum per entry.
// 128 left most of an H200 idle (ncu: 417 blocks of 2 warps at S = 8, d = 128, 4.5 % achieved
// occupancy against 12.5 % possible); 1024 fills several waves at the paper's sizes.
constexpr int kMaxBackwardBlocksPerSegment = 1024;
constexpr int kMaxForwardBlocksPerSegment = 4096;

struct Segments {
  int64_t offsets[kMaxK + 1];
  int block_start[kMaxK + 1];  // blocks [block_start[k], block_start[k+1]) serve controller k
  int K;
};

template <typename T>
struct Args {
  const T *theta, *grad, *loss, *h, *c, *w_ih, *w_hh, *b_ih, *b_hh, *ln_w, *ln_b, *w_gate, *b_gate;
  T *theta_new, *h_new, *c_new, *alpha, *beta;
  const T *d_theta_new, *d_h_new, *d_c_new, *d_alpha, *d_beta;
  T *d_theta, *d_h, *d_c, *partials;
  T *g_w_ih, *g_w_hh, *g_b_ih, *g_b_hh, *g_ln_w, *g_ln_b, *g_w_gate, *g_b_gate;
  int64_t S, N, P;
  int H;
  bool layer_norm;
  bool vec_rows;  // H == 16 and aligned rows: rows and weight rows move as 16-byte vectors (load_row, dot_row)
  T p, threshold, exp_p, clip, eps;
};

template <typename T>
__device__ __forceinline__ T sigmoid(T z) {
  const T e = ::exp(-::fabs(z));  // never overflows; same formula as the CPU kernel
  const T r = T(1) / (T(1) + e);
  return z >= T(0) ? r : e * r;
}

template <typename T>
__device__ __forceinline__ T tanh_(T x) {
  return ::tanh(x);
}

// A coordinate's H-wide row of h, c or their gradients: one thread reads or writes H values.
// With a.vec_rows (H == MAXH and every such row 16-byte aligned, checked by the launcher) a row
// moves as 16-byte vectors: a quarter (fp32) or half (fp64) of the memory instructions, and full
// sectors where scalar accesses used 4 of every 32 bytes per instruction. The flag is uniform
// across the grid, so the branch costs nothing. (Making H a compile-time constant instead let the
// compiler hoist all 4H(5 + H) shared-memory weight loads: 5 KB of spills per thread.)
template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  using type = float4;
  static constexpr int n = 4;
};
template <>
struct Vec16<double> {
  using type = double2;
  static constexpr int n = 2;
};

template <typename T, int MAXH>
__device__ __forceinline__ void load_row(const T* row, int H, bool vec, T (&v)[MAXH]) {
  static_assert(MAXH % Vec16<T>::n == 0, "rows move in whole 16-byte vectors");
  if (vec) {
    using V = typename Vec16<T>::type;
    constexpr int n = Vec16<T>::n;
    const V* p = reinterpret_cast<const V*>(row);
#pragma unroll
    for (int i = 0; i < MAXH / n; ++i) {
      const V w = p[i];
      const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
      for (int j = 0; j < n; ++j) v[i * n + j] = e[j];
    }
  } else {
#pragma unroll
    for (int q = 0; q < MAXH; ++q) v[q] = q < H ? row[q] : T(0);
  }
}

template <typename T, int MAXH>
__device__ __forceinline__ void store_row(T* row, int H, bool vec, const T (&v)[MAXH]) {
  if (vec) {
    using V = typename Vec16<T>::type;
    constexpr int n = Vec16<T>::n;
    V* p = reinterpret_cast<V*>(row);
#pragma unroll
    for (int i = 0; i < MAXH / n; ++i) {
      V w;
      T* e = reinterpret_cast<T*>(&w);
#pragma unroll
      for (int j = 0; j < n; ++j) e[j] = v[i * n + j];
      p[i] = w;
    }
  } else {
#pragma unroll
    for (int q = 0; q < MAXH; ++q)
      if (q < H) row[q] = v[q];
  }
}

__device__ __forceinline__ int controller_of_block(const Segments& seg, int block) {
  int k = 0;
  while (k + 1 < seg.K && seg.block_start[k + 1] <= block) ++k;
  return k;
}

// Shared-memory copy of controller k: w_ih [4H,5] | w_hh [4H,H] | b_ih + b_hh [4H] | ln_w [H] |
// ln_b [H] | w_gate [2,H] | b_gate [2].
template <typename T>
__device__ void load_controller(const Args<T>& a, int k, T* sw) {
  const int H = a.H, G = 4 * H;
  for (int e = threadIdx.x; e < G * kFeatures; e += blockDim.x) sw[e] = a.w_ih[k * G * kFeatures + e];
  T* whh = sw + G * kFeatures;
  for (int e = threadIdx.x; e < G * H; e += blockDim.x) whh[e] = a.w_hh[int64_t(k) * G * H + e];
  T* bias = whh + G * H;
  for (int e = threadIdx.x; e < G; e += blockDim.x) bias[e] = a.b_ih[k * G + e] + a.b_hh[k * G + e];
  T* rest = bias + G;
  for (int e = threadIdx.x; e < H; e += blockDim.x) {
    rest[e] = a.layer_norm ? a.ln_w[k * H + e] : T(1);
    rest[H + e] = a.layer_norm ? a.ln_b[k * H + e] : T(0);
  }
  for (int e = threadIdx.x; e < 2 * H; e += blockDim.x) rest[2 * H + e] = a.w_gate[k * 2 * H + e];
  if (threadIdx.x < 2) rest[4 * H + threadIdx.x] = a.b_gate[2 * k + threadIdx.x];
}

template <typename T>
__host__ __device__ inline int controller_smem_elems(int H) {
  return 4 * H * kFeatures + 4 * H * H + 4 * H + 4 * H + 2;
}

// acc + w[0:H] . h, in ascending u either way. With vec (H == MAXH) the shared-memory row, 16-byte
// aligned at H = 16, is read as 16-byte vectors: a quarter of the load instructions, which bound
// these loops (every warp reads the same weights, so each load is one broadcast wavefront).
template <typename T, int MAXH>
__device__ __forceinline__ T dot_row(const T* w, const T (&h)[MAXH], int H, bool vec, T acc) {
  if (vec) {
    using V = typename Vec16<T>::type;
    constexpr int n = Vec16<T>::n;
    const V* p = reinterpret_cast<const V*>(w);
#pragma unroll
    for (int i = 0; i < MAXH / n; ++i) {
      const V v = p[i];
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int j = 0; j < n; ++j) acc += e[j] * h[i * n + j];
    }
  } else {
#pragma unroll
    for (int u = 0; u < MAXH; ++u)
      if (u < H) acc += w[u] * h[u];
  }
  return acc;
}

// out[0:H] += s * w[0:H], vectorised as dot_row.
template <typename T, int MAXH>
__device__ __forceinline__ void axpy_row(const T* w, T s, int H, bool vec, T (&out)[MAXH]) {
  if (vec) {
    using V = typename Vec16<T>::type;
    constexpr int n = Vec16<T>::n;
    const V* p = reinterpret_cast<const V*>(w);
#pragma unroll
    for (int i = 0; i < MAXH / n; ++i) {
      const V v = p[i];
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int j = 0; j < n; ++j) out[i * n + j] += e[j] * s;
    }
  } else {
#pragma unroll
    for (int u = 0; u < MAXH; ++u)
      if (u < H) out[u] += w[u] * s;
  }
}

// The gate pre-activations of hidden unit q: z_r = bias_r + W_ih[r] x + W_hh[r] h for the four
// rows r = q, H+q, 2H+q, 3H+q (order i, f, g, o).
template <typename T, int MAXH>
__device__ __forceinline__ void unit_gates(const T* sw, int H, bool vec, int q, const T (&x)[kFeatures],
                                           const T (&h)[MAXH], T& gi, T& gf, T& gg, T& go) {
  const int G = 4 * H;
  const T* wih = sw;
  const T* whh = sw + G * kFeatures;
  const T* bias = whh + G * H;
  T z[4];
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) {
    const int r = gate * H + q;
    T acc = bias[r];
#pragma unroll
    for (int j = 0; j < kFeatures; ++j) acc += wih[r * kFeatures + j] * x[j];
    z[gate] = dot_row<T, MAXH>(whh + r * H, h, H, vec, acc);
  }
  gi = sigmoid(z[0]);
  gf = sigmoid(z[1]);
  gg = tanh_(z[2]);
  go = sigmoid(z[3]);
}

// Forward of one coordinate up to the heads. Leaves the features in x, h in h_prev, the
// normalised units (or, without LayerNorm, the units) in xhat; writes c' to c_out if given.
template <typename T, int MAXH>
__device__ __forceinline__ void coord_forward(const Args<T>& a, const T* sw, int64_t s, int64_t idx, T (&x)[kFeatures],
                                              T (&h_prev)[MAXH], T (&xhat)[MAXH], T& rstd, T& alpha, T& beta, T& g,
                                              T& th, T* c_out) {
  const int H = a.H;
  g = lstm::clamp_keep_nan(a.grad[idx], a.clip);
  th = a.theta[idx];
  preprocess_scalar(g, a.p, a.threshold, a.exp_p, &x[0], &x[1]);
  preprocess_scalar(th, a.p, a.threshold, a.exp_p, &x[2], &x[3]);
  T unused;
  preprocess_scalar(a.loss[s], a.p, a.threshold, a.exp_p, &x[4], &unused);
  load_row<T, MAXH>(a.h + idx * H, H, a.vec_rows, h_prev);
  // c stays scalar: a [MAXH] array for it would cost 47 more registers in the forward
  const T* c_row = a.c + idx * H;
#pragma unroll
  for (int q = 0; q < MAXH; ++q) {
    if (q < H) {
      T gi, gf, gg, go;
      unit_gates<T, MAXH>(sw, H, a.vec_rows, q, x, h_prev, gi, gf, gg, go);
      const T c_new = gf * c_row[q] + gi * gg;
      if (c_out != nullptr) c_out[idx * H + q] = c_new;
      xhat[q] = go * tanh_(c_new);
    }
  }
  const T* rest = sw + controller_smem_elems<T>(H) - 4 * H - 2;
  rstd = T(1);
  if (a.layer_norm) {
    T mean = T(0);
#pragma unroll
    for (int q = 0; q < MAXH; ++q)
      if (q < H) mean += xhat[q];
    mean /= T(H);
    T var = T(0);
#pragma unroll
    for (int q = 0; q < MAXH; ++q)
      if (q < H) var += (xhat[q] - mean) * (xhat[q] - mean);
    rstd = T(1) / ::sqrt(var / T(H) + a.eps);
#pragma unroll
    for (int q = 0; q < MAXH; ++q)
      if (q < H) xhat[q] = (xhat[q] - mean) * rstd;
  }
  const T* lw = rest;
  const T* lb = rest + H;
  const T* wg = rest + 2 * H;
  T za = rest[4 * H], zb = rest[4 * H + 1];
#pragma unroll
  for (int q = 0; q < MAXH; ++q) {
    if (q < H) {
      const T hn = xhat[q] * lw[q] + lb[q];
      za += wg[q] * hn;
      zb += wg[H + q] * hn;
    }
  }
  alpha = sigmoid(za);
  beta = sigmoid(zb);
}

template <typename T, int MAXH>
__global__ void lstm_forward_kernel(Args<T> a, Segments seg) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sw = reinterpret_cast<T*>(smem_raw);
  const int k = controller_of_block(seg, blockIdx.x);
  load_controller(a, k, sw);
  __syncthreads();
  const int H = a.H;
  const int64_t lo = seg.offsets[k], n = seg.offsets[k + 1] - lo, total = n * a.S;
  const int64_t stride = int64_t(seg.block_start[k + 1] - seg.block_start[k]) * blockDim.x;
  const T* rest = sw + controller_smem_elems<T>(H) - 4 * H - 2;
  for (int64_t t = int64_t(blockIdx.x - seg.block_start[k]) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t s = t / n, idx = s * a.N + lo + t % n;
    T x[kFeatures], h_prev[MAXH], xhat[MAXH], rstd, alpha, beta, g, th;
    coord_forward<T, MAXH>(a, sw, s, idx, x, h_prev, xhat, rstd, alpha, beta, g, th, a.c_new);
#pragma unroll
    for (int q = 0; q < MAXH; ++q) xhat[q] = q < H ? xhat[q] * rest[q] + rest[H + q] : T(0);
    store_row<T, MAXH>(a.h_new + idx * H, H, a.vec_rows, xhat);
    a.alpha[idx] = alpha;
    a.beta[idx] = beta;
    a.theta_new[idx] = beta * th - alpha * g;
  }
}

// Per-coordinate factors of the weight gradients, stashed for the block-wide sums:
// dz [4H] | x_aug [5+H+1] (features, h, 1) | dy [H] | xhat [H] | hn [H] | dza | dzb.
__host__ __device__ inline int stash_elems(int H) { return 4 * H + (kFeatures + H + 1) + 3 * H + 2; }
// Each thread's stash row starts this many elements after the previous one: odd, so the 32 rows a
// warp writes at once fall in 32 different banks (136 at H = 16 put them in 8).
__host__ __device__ inline int stash_stride(int H) { return stash_elems(H) | 1; }

template <typename T, int MAXH>
__global__ void lstm_backward_kernel(Args<T> a, Segments seg) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sw = reinterpret_cast<T*>(smem_raw);
  const int H = a.H, G = 4 * H, F1 = kFeatures + H + 1, V = stash_stride(H);
  T* stash = sw + controller_smem_elems<T>(H);
  const int k = controller_of_block(seg, blockIdx.x);
  load_controller(a, k, sw);
  T* row = a.partials + int64_t(blockIdx.x) * a.P;
  for (int64_t e = threadIdx.x; e < a.P; e += blockDim.x) row[e] = T(0);
  __syncthreads();

  const T* rest = sw + controller_smem_elems<T>(H) - 4 * H - 2;
  const T* lw = rest;
  const T* lb = rest + H;
  const T* wg = rest + 2 * H;
  const T* whh = sw + G * kFeatures;
  const int64_t lo = seg.offsets[k], n = seg.offsets[k + 1] - lo, total = n * a.S;
  const int64_t stride = int64_t(seg.block_start[k + 1] - seg.block_start[k]) * blockDim.x;
  T* mine = stash + threadIdx.x * V;
  // The loop bound is block-uniform so every thread reaches the __syncthreads below.
  for (int64_t first = int64_t(blockIdx.x - seg.block_start[k]) * blockDim.x; first < total; first += stride) {
    const int64_t t = first + threadIdx.x;
    for (int e = 0; e < V; ++e) mine[e] = T(0);  // idle threads contribute nothing
    if (t < total) {
      const int64_t s = t / n, idx = s * a.N + lo + t % n;
      T x[kFeatures], h_prev[MAXH], xhat[MAXH], rstd, alpha, beta, g, th;
      coord_forward<T, MAXH>(a, sw, s, idx, x, h_prev, xhat, rstd, alpha, beta, g, th, nullptr);

      const T dtn = a.d_theta_new[idx];
      a.d_theta[idx] = dtn * beta;
      const T dza = (a.d_alpha[idx] - dtn * g) * alpha * (T(1) - alpha);
      const T dzb = (a.d_beta[idx] + dtn * th) * beta * (T(1) - beta);
      T du[MAXH];  // holds dh' until it is overwritten by the LayerNorm input gradient
      load_row<T, MAXH>(a.d_h_new + idx * H, H, a.vec_rows, du);
      T m1 = T(0), m2 = T(0);
#pragma unroll
      for (int q = 0; q < MAXH; ++q) {
        if (q < H) {
          const T dy = du[q] + dza * wg[q] + dzb * wg[H + q];
          mine[G + F1 + q] = dy;
          mine[G + F1 + H + q] = xhat[q];
          mine[G + F1 + 2 * H + q] = xhat[q] * lw[q] + lb[q];
          du[q] = a.layer_norm ? dy * lw[q] : dy;
          m1 += du[q];
          m2 += du[q] * xhat[q];
        }
      }
      mine[G + F1 + 3 * H] = dza;
      mine[G + F1 + 3 * H + 1] = dzb;
      if (a.layer_norm) {
        m1 /= T(H);
        m2 /= T(H);
#pragma unroll
        for (int q = 0; q < MAXH; ++q)
          if (q < H) du[q] = rstd * (du[q] - m1 - xhat[q] * m2);
      }

      T dh[MAXH];
#pragma unroll
      for (int q = 0; q < MAXH; ++q) dh[q] = T(0);
      const T* c_row = a.c + idx * H;
      T dc[MAXH];  // dc' in, dc out
      load_row<T, MAXH>(a.d_c_new + idx * H, H, a.vec_rows, dc);
#pragma unroll
      for (int q = 0; q < MAXH; ++q) {
        if (q < H) {
          T gi, gf, gg, go;
          unit_gates<T, MAXH>(sw, H, a.vec_rows, q, x, h_prev, gi, gf, gg, go);
          const T c_prev = c_row[q];
          const T tc = tanh_(gf * c_prev + gi * gg);
          const T dc_tot = dc[q] + du[q] * go * (T(1) - tc * tc);
          dc[q] = dc_tot * gf;
          const T dz[4] = {dc_tot * gg * gi * (T(1) - gi), dc_tot * c_prev * gf * (T(1) - gf),
                           dc_tot * gi * (T(1) - gg * gg), du[q] * tc * go * (T(1) - go)};
#pragma unroll
          for (int gate = 0; gate < 4; ++gate) {
            const int r = gate * H + q;
            mine[r] = dz[gate];
            axpy_row<T, MAXH>(whh + r * H, dz[gate], H, a.vec_rows, dh);
          }
        }
      }
      store_row<T, MAXH>(a.d_c + idx * H, H, a.vec_rows, dc);
      store_row<T, MAXH>(a.d_h + idx * H, H, a.vec_rows, dh);
#pragma unroll
      for (int j = 0; j < kFeatures; ++j) mine[G + j] = x[j];
#pragma unroll
      for (int q = 0; q < MAXH; ++q)
        if (q < H) mine[G + kFeatures + q] = h_prev[q];
      mine[G + F1 - 1] = T(1);
    }
    __syncthreads();
    // Thread e owns partial entries e, e + blockDim, ...: sums over the tile in thread order.
    for (int64_t e = threadIdx.x; e < a.P; e += blockDim.x) {
      T acc = T(0);
      if (e < int64_t(G) * F1) {
        const int r = int(e / F1), j = int(e % F1);
        for (int u = 0; u < blockDim.x; ++u) acc += stash[u * V + r] * stash[u * V + G + j];
      } else {
        const int f = int(e - int64_t(G) * F1);
        const int dy = G + F1, xh = dy + H, hn = xh + H, dza = hn + H;
        for (int u = 0; u < blockDim.x; ++u) {
          const T* su = stash + u * V;
          if (f < H) acc += su[dy + f] * su[xh + f];                        // ln_weight
          else if (f < 2 * H) acc += su[dy + f - H];                        // ln_bias
          else if (f < 3 * H) acc += su[dza] * su[hn + f - 2 * H];          // w_gate[0]
          else if (f < 4 * H) acc += su[dza + 1] * su[hn + f - 3 * H];      // w_gate[1]
          else acc += su[dza + (f - 4 * H)];                                // b_gate
        }
      }
      row[e] += acc;
    }
    __syncthreads();
  }
}

// Sums each controller's partial rows in block order and scatters them into the gradients.
template <typename T>
__global__ void lstm_reduce_kernel(Args<T> a, Segments seg) {
  const int H = a.H, G = 4 * H, F1 = kFeatures + H + 1;
  const int64_t total = int64_t(seg.K) * a.P;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const int k = int(i / a.P);
    const int64_t e = i % a.P;
    T acc = T(0);
    for (int b = seg.block_start[k]; b < seg.block_start[k + 1]; ++b) acc += a.partials[int64_t(b) * a.P + e];
    if (e < int64_t(G) * F1) {
      const int r = int(e / F1), j = int(e % F1);
      if (j < kFeatures) {
        a.g_w_ih[(int64_t(k) * G + r) * kFeatures + j] = acc;
      } else if (j < kFeatures + H) {
        a.g_w_hh[(int64_t(k) * G + r) * H + (j - kFeatures)] = acc;
      } else {
        a.g_b_ih[int64_t(k) * G + r] = acc;
        a.g_b_hh[int64_t(k) * G + r] = acc;
      }
    } else {
      const int f = int(e - int64_t(G) * F1);
      if (f < H) {
        if (a.layer_norm) a.g_ln_w[k * H + f] = acc;
      } else if (f < 2 * H) {
        if (a.layer_norm) a.g_ln_b[k * H + f - H] = acc;
      } else if (f < 4 * H) {
        a.g_w_gate[k * 2 * H + f - 2 * H] = acc;
      } else {
        a.g_b_gate[2 * k + f - 4 * H] = acc;
      }
    }
  }
}

Segments make_segments(const Dims& d, at::IntArrayRef offsets, int threads, int max_blocks_per_segment,
                       int* total_blocks) {
  TORCH_CHECK(d.K <= kMaxK, "lstm_update_multi: the CUDA kernels take at most ", kMaxK,
              " controllers (offsets of length <= ", kMaxK + 1, "), got K = ", d.K);
  Segments seg{};
  seg.K = static_cast<int>(d.K);
  int blocks = 0;
  for (int64_t k = 0; k <= d.K; ++k) seg.offsets[k] = offsets[k];
  for (int64_t k = 0; k < d.K; ++k) {
    seg.block_start[k] = blocks;
    const int64_t work = (offsets[k + 1] - offsets[k]) * d.S;
    blocks += static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, max_blocks_per_segment));
  }
  seg.block_start[d.K] = blocks;
  *total_blocks = blocks;
  return seg;
}

template <typename T>
void fill_inputs(Args<T>& a, const Dims& d, const lstm::Inputs& in, double p, double clip) {
  a = Args<T>{};
  a.theta = in.theta.const_data_ptr<T>();
  a.grad = in.grad.const_data_ptr<T>();
  a.loss = in.loss.const_data_ptr<T>();
  a.h = in.h.const_data_ptr<T>();
  a.c = in.c.const_data_ptr<T>();
  a.w_ih = in.w_ih.const_data_ptr<T>();
  a.w_hh = in.w_hh.const_data_ptr<T>();
  a.b_ih = in.b_ih.const_data_ptr<T>();
  a.b_hh = in.b_hh.const_data_ptr<T>();
  a.ln_w = d.layer_norm ? in.ln_w.const_data_ptr<T>() : nullptr;
  a.ln_b = d.layer_norm ? in.ln_b.const_data_ptr<T>() : nullptr;
  a.w_gate = in.w_gate.const_data_ptr<T>();
  a.b_gate = in.b_gate.const_data_ptr<T>();
  a.S = d.S;
  a.N = d.N;
  a.H = static_cast<int>(d.H);
  a.layer_norm = d.layer_norm;
  a.p = static_cast<T>(p);
  a.threshold = static_cast<T>(std::exp(-p));
  a.exp_p = static_cast<T>(std::exp(p));
  a.clip = static_cast<T>(clip);
  a.eps = static_cast<T>(lstm::kLayerNormEps);
}

// Kernels above 48 KiB of dynamic shared memory must opt in (a host-side attribute, no sync).
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Per-thread state lives in registers, sized at compile time; one instantiation keeps the
// build short (the paper uses H = 16).
constexpr int kMaxHiddenCuda = 16;

// Rows move as 16-byte vectors when H is the kernels' maximum and every row is 16-byte aligned
// (rows are 16 H bytes apart, so aligned bases suffice; a tensor sliced at an odd offset does not).
bool vector_rows(int H, std::initializer_list<const void*> rows) {
  if (H != kMaxHiddenCuda) return false;
  for (const void* p : rows)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

void check_hidden(const Dims& d) {
  TORCH_CHECK(d.H <= kMaxHiddenCuda, "lstm_update_multi: the CUDA kernels support hidden sizes up to ",
              kMaxHiddenCuda, ", got H = ", d.H, " (h.size(2))");
}

using OutputTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

OutputTuple lstm_update_multi_cuda(const at::Tensor& theta_in, const at::Tensor& grad_in, const at::Tensor& loss_in,
                               const at::Tensor& h_in, const at::Tensor& c_in, at::IntArrayRef offsets,
                               const at::Tensor& w_ih_in, const at::Tensor& w_hh_in, const at::Tensor& b_ih_in,
                               const at::Tensor& b_hh_in, const std::optional<at::Tensor>& ln_weight,
                               const std::optional<at::Tensor>& ln_bias, const at::Tensor& w_gate_in,
                               const at::Tensor& b_gate_in, double p, double clip) {
  const Dims d = lstm::check_multi_args("lstm_update_multi", theta_in, grad_in, loss_in, h_in, c_in, offsets, w_ih_in,
                                        w_hh_in, b_ih_in, b_hh_in, ln_weight, ln_bias, w_gate_in, b_gate_in, p, clip);
  check_hidden(d);
  const c10::cuda::CUDAGuard guard(theta_in.device());
  const lstm::Inputs in = lstm::contiguous_inputs(theta_in, grad_in, loss_in, h_in, c_in, w_ih_in, w_hh_in, b_ih_in,
                                                  b_hh_in, ln_weight, ln_bias, w_gate_in, b_gate_in);
  lstm::Outputs out(in);
  if (in.theta.numel() == 0) return out.as_tuple();

  int blocks = 0;
  const Segments seg = make_segments(d, offsets, kForwardThreads, kMaxForwardBlocksPerSegment, &blocks);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.theta.scalar_type(), "lstm_update_multi_cuda", [&] {
    Args<scalar_t> a;
    fill_inputs(a, d, in, p, clip);
    a.theta_new = out.theta_new.mutable_data_ptr<scalar_t>();
    a.h_new = out.h_new.mutable_data_ptr<scalar_t>();
    a.c_new = out.c_new.mutable_data_ptr<scalar_t>();
    a.alpha = out.alpha.mutable_data_ptr<scalar_t>();
    a.beta = out.beta.mutable_data_ptr<scalar_t>();
    const size_t smem = sizeof(scalar_t) * controller_smem_elems<scalar_t>(a.H);
    a.vec_rows = vector_rows(a.H, {a.h, a.h_new});
    lstm_forward_kernel<scalar_t, kMaxHiddenCuda><<<blocks, kForwardThreads, smem, stream>>>(a, seg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.as_tuple();
}

lstm::GradientTuple lstm_update_multi_backward_cuda(
    const at::Tensor& d_theta_new_in, const at::Tensor& d_h_new_in, const at::Tensor& d_c_new_in,
    const at::Tensor& d_alpha_in, const at::Tensor& d_beta_in, const at::Tensor& theta_in, const at::Tensor& grad_in,
    const at::Tensor& loss_in, const at::Tensor& h_in, const at::Tensor& c_in, at::IntArrayRef offsets,
    const at::Tensor& w_ih_in, const at::Tensor& w_hh_in, const at::Tensor& b_ih_in, const at::Tensor& b_hh_in,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, const at::Tensor& w_gate_in,
    const at::Tensor& b_gate_in, double p, double clip) {
  const char* op = "lstm_update_multi_backward";
  const Dims d = lstm::check_multi_args(op, theta_in, grad_in, loss_in, h_in, c_in, offsets, w_ih_in, w_hh_in, b_ih_in,
                                        b_hh_in, ln_weight, ln_bias, w_gate_in, b_gate_in, p, clip);
  lstm::check_output_grads(op, d, theta_in, d_theta_new_in, d_h_new_in, d_c_new_in, d_alpha_in, d_beta_in);
  check_hidden(d);
  const c10::cuda::CUDAGuard guard(theta_in.device());
  const lstm::Inputs in = lstm::contiguous_inputs(theta_in, grad_in, loss_in, h_in, c_in, w_ih_in, w_hh_in, b_ih_in,
                                                  b_hh_in, ln_weight, ln_bias, w_gate_in, b_gate_in);
  const lstm::OutputGrads up =
      lstm::contiguous_output_grads(d_theta_new_in, d_h_new_in, d_c_new_in, d_alpha_in, d_beta_in);
  lstm::InputGrads g(d, in);
  if (in.theta.numel() == 0) return g.as_tuple();

  int blocks = 0;
  const Segments seg = make_segments(d, offsets, kBackwardThreads, kMaxBackwardBlocksPerSegment, &blocks);
  const int64_t H = d.H, G = 4 * H, F1 = kFeatures + H + 1;
  const int64_t P = G * F1 + 4 * H + 2;
  at::Tensor partials = at::empty({blocks, P}, in.theta.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.theta.scalar_type(), "lstm_update_multi_backward_cuda", [&] {
    Args<scalar_t> a;
    fill_inputs(a, d, in, p, clip);
    a.d_theta_new = up.d_theta_new.const_data_ptr<scalar_t>();
    a.d_h_new = up.d_h_new.const_data_ptr<scalar_t>();
    a.d_c_new = up.d_c_new.const_data_ptr<scalar_t>();
    a.d_alpha = up.d_alpha.const_data_ptr<scalar_t>();
    a.d_beta = up.d_beta.const_data_ptr<scalar_t>();
    a.d_theta = g.d_theta.mutable_data_ptr<scalar_t>();
    a.d_h = g.d_h.mutable_data_ptr<scalar_t>();
    a.d_c = g.d_c.mutable_data_ptr<scalar_t>();
    a.partials = partials.mutable_data_ptr<scalar_t>();
    a.P = P;
    a.g_w_ih = g.d_w_ih.mutable_data_ptr<scalar_t>();
    a.g_w_hh = g.d_w_hh.mutable_data_ptr<scalar_t>();
    a.g_b_ih = g.d_b_ih.mutable_data_ptr<scalar_t>();
    a.g_b_hh = g.d_b_hh.mutable_data_ptr<scalar_t>();
    a.g_ln_w = d.layer_norm ? g.d_ln_w.mutable_data_ptr<scalar_t>() : nullptr;
    a.g_ln_b = d.layer_norm ? g.d_ln_b.mutable_data_ptr<scalar_t>() : nullptr;
    a.g_w_gate = g.d_w_gate.mutable_data_ptr<scalar_t>();
    a.g_b_gate = g.d_b_gate.mutable_data_ptr<scalar_t>();
    const size_t smem =
        sizeof(scalar_t) * (controller_smem_elems<scalar_t>(a.H) + size_t(kBackwardThreads) * stash_stride(a.H));
    a.vec_rows = vector_rows(a.H, {a.h, a.d_h_new, a.d_c_new, a.d_h, a.d_c});
    allow_shared(lstm_backward_kernel<scalar_t, kMaxHiddenCuda>, smem);
    lstm_backward_kernel<scalar_t, kMaxHiddenCuda><<<blocks, kBackwardThreads, smem, stream>>>(a, seg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t reduce_items = d.K * P;
    const int reduce_threads = 256;
    const int reduce_blocks = static_cast<int>(std::min<int64_t>((reduce_items + reduce_threads - 1) / reduce_threads, 4096));
    lstm_reduce_kernel<scalar_t><<<reduce_blocks, reduce_threads, 0, stream>>>(a, seg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(s2meta, CUDA, m) {
  m.impl("lstm_update_multi", &lstm_update_multi_cuda);
  m.impl("lstm_update_multi_backward", &lstm_update_multi_backward_cuda);
}

}  // namespace s2meta
