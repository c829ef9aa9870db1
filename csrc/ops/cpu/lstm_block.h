// One block of the CPU lstm_update kernel: kBlock coordinates of one controller's segment, stored
// feature-major ([row][lane]) so the 4H x (5+H) matvec becomes a register-blocked GEMM and every
// activation a flat loop the compiler vectorises. The controller weights prepared once per call,
// the per-thread scratch, and the forward and backward of a block (the backward recomputes the
// forward's intermediates instead of storing them). Everything here is always-inline over the lane
// width VB, so it compiles into each ISA clone of the kernel's drivers (lstm_update_kernel.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "ops/cpu/isa.h"
#include "ops/cpu/lstm_block_gemm.h"
#include "ops/cpu/lstm_block_transpose.h"
#include "ops/cpu/lstm_vector_math.h"
#include "ops/grad_preprocess.h"
#include "ops/lstm_update.h"

namespace s2meta {
namespace lstm_cpu {

using lstm::Dims;

constexpr int kBlock = 16;  // coordinates per block (lanes)

// A run of blocks [t_begin, t_end) of controller k; block t covers scenario t / blocks_per_row,
// coordinates offsets[k] + (t % blocks_per_row) * kBlock onwards.
struct Chunk {
  int64_t k, t_begin, t_end, blocks_per_row;
};

// Controller weights rearranged once per call: [W_ih | W_hh] as one [4H, 5+H] matrix, the two
// biases summed, and W_hh transposed for the backward's dh = W_hh^T dz.
template <typename T>
struct PreparedWeights {
  std::vector<T> wcat, wpack, bias, whh_t;  // wpack: wcat as [K][4H/4][5+H][4]
  std::vector<T> whh_t_pack, zeros;            // whh_t as [K][H/4][4H][4] when 4 divides H
  const T* ln_w = nullptr;
  const T* ln_b = nullptr;
  const T* w_gate = nullptr;
  const T* b_gate = nullptr;

  PreparedWeights(const Dims& d, const lstm::Inputs& in, bool transpose_hh) {
    const int64_t H = d.H, G = 4 * H, F = lstm::kFeatures + H;
    wcat.resize(d.K * G * F);
    bias.resize(d.K * G);
    const T* wi = in.w_ih.const_data_ptr<T>();
    const T* wh = in.w_hh.const_data_ptr<T>();
    const T* bi = in.b_ih.const_data_ptr<T>();
    const T* bh = in.b_hh.const_data_ptr<T>();
    for (int64_t k = 0; k < d.K; ++k) {
      for (int64_t r = 0; r < G; ++r) {
        T* row = wcat.data() + (k * G + r) * F;
        for (int64_t j = 0; j < lstm::kFeatures; ++j) row[j] = wi[(k * G + r) * lstm::kFeatures + j];
        for (int64_t q = 0; q < H; ++q) row[lstm::kFeatures + q] = wh[(k * G + r) * H + q];
        bias[k * G + r] = bi[k * G + r] + bh[k * G + r];
      }
    }
    wpack.resize(wcat.size());
    for (int64_t k = 0; k < d.K; ++k)
      for (int64_t r = 0; r < G; ++r)
        for (int64_t j = 0; j < F; ++j) wpack[((k * G + r / 4 * 4) * F + j * 4) + r % 4] = wcat[(k * G + r) * F + j];
    if (transpose_hh) {
      whh_t.resize(d.K * H * G);
      for (int64_t k = 0; k < d.K; ++k)
        for (int64_t r = 0; r < G; ++r)
          for (int64_t q = 0; q < H; ++q) whh_t[(k * H + q) * G + r] = wh[(k * G + r) * H + q];
      if (H % 4 == 0) {  // the same, packed in groups of four rows for gemm_block_packed4
        whh_t_pack.resize(whh_t.size());
        for (int64_t k = 0; k < d.K; ++k)
          for (int64_t q = 0; q < H; ++q)
            for (int64_t r = 0; r < G; ++r)
              whh_t_pack[(k * H + q / 4 * 4) * G + r * 4 + q % 4] = whh_t[(k * H + q) * G + r];
        zeros.assign(H, T(0));
      }
    }
    if (d.layer_norm) {
      ln_w = in.ln_w.const_data_ptr<T>();
      ln_b = in.ln_b.const_data_ptr<T>();
    }
    w_gate = in.w_gate.const_data_ptr<T>();
    b_gate = in.b_gate.const_data_ptr<T>();
  }
};

// Everything a block needs, for the forward and the backward.
template <typename T>
struct Ctx {
  Dims d;
  const int64_t* offsets;
  const Chunk* chunks;
  const PreparedWeights<T>* w;
  const T* theta;
  const T* grad;
  const T* h;
  const T* c;
  const T* loss_feature;  // [S], pre(loss)_0, pointing into loss_feature_values
  std::vector<T> loss_feature_values;
  T p, threshold, exp_p, clip, eps;
  // forward outputs
  T *theta_new = nullptr, *h_new = nullptr, *c_new = nullptr, *alpha_out = nullptr, *beta_out = nullptr;
  // backward inputs / outputs
  const T *d_theta_new = nullptr, *d_h_new = nullptr, *d_c_new = nullptr, *d_alpha = nullptr, *d_beta = nullptr;
  T *d_theta = nullptr, *d_h = nullptr, *d_c = nullptr;
  T* partials = nullptr;  // [n_chunks, partial_size]
  int64_t partial_stride = 0;
  int64_t padded_features = 0;  // row length of the backward's weight-gradient tile
};

// Per-thread scratch of one block; every array is [rows][kBlock].
template <typename T>
struct Scratch {
  std::vector<T> storage;
  T *in, *in_t, *act, *c_prev, *c_new, *tanh_c, *xhat, *h_new, *dz, *dh_tot, *dh_out, *dc_out;
  // Per-lane sums of the small weight gradients (d ln_w, d ln_b, d w_gate, d b_gate: 4H + 2 rows,
  // the layout of a partial's tail) over a chunk: summed across lanes once per chunk instead of
  // once per block, which were 4H + 2 horizontal reductions per 16 coordinates.
  T* lane_sums;
  T th[kBlock], g[kBlock], alpha[kBlock], beta[kBlock], rstd[kBlock];

  Scratch(int64_t H, int64_t padded_features) {
    const int64_t F = lstm::kFeatures + H, G = 4 * H;
    const int64_t sizes[] = {F * kBlock, padded_features * kBlock, G * kBlock, H * kBlock, H * kBlock, H * kBlock,
                             H * kBlock, H * kBlock, G * kBlock, H * kBlock, H * kBlock, H * kBlock,
                             (4 * H + 2) * kBlock};
    int64_t total = 0;
    for (int64_t s : sizes) total += s;
    storage.assign(total, T(0));
    T* cursor = storage.data();
    T** slots[] = {&in, &in_t, &act, &c_prev, &c_new, &tanh_c, &xhat, &h_new, &dz, &dh_tot, &dh_out, &dc_out, &lane_sums};
    for (int i = 0; i < 13; ++i) {
      *slots[i] = cursor;
      cursor += sizes[i];
    }
  }
};

// Software prefetch of the [kBlock, H] rows of a block a few blocks ahead: with S x N x H
// streams larger than the last-level cache, the hardware prefetcher alone leaves the block's
// transposes waiting on memory.
constexpr int64_t kPrefetchBlocks = 2;
template <typename T>
S2META_ALWAYS_INLINE void prefetch_rows(const T* p, int64_t count, bool write) {
#if defined(__GNUC__)
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) {
    if (write)
      __builtin_prefetch(c + off, 1, 3);
    else
      __builtin_prefetch(c + off, 0, 3);
  }
#else
  (void)p;
  (void)count;
  (void)write;
#endif
}

// Base offset (s * N + j0) of block t of a chunk.
S2META_ALWAYS_INLINE int64_t block_base(const Chunk& ch, int64_t lo, int64_t N, int64_t t) {
  return (t / ch.blocks_per_row) * N + lo + (t % ch.blocks_per_row) * kBlock;
}

// The elementwise cell loops, as functions of restrict pointers: the scratch arrays share one
// allocation, and without the promise GCC leaves these loops scalar.
template <typename T>
S2META_ALWAYS_INLINE void cell_forward(int64_t n, const T* __restrict__ gi, const T* __restrict__ gf,
                                       const T* __restrict__ gg, const T* __restrict__ c_prev, T* __restrict__ c_new,
                                       T* __restrict__ tanh_c) {
  for (int64_t e = 0; e < n; ++e) {
    const T c = gf[e] * c_prev[e] + gi[e] * gg[e];
    c_new[e] = c;
    tanh_c[e] = c;
  }
}

template <typename T>
S2META_ALWAYS_INLINE void mul_into(int64_t n, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out) {
  for (int64_t e = 0; e < n; ++e) out[e] = a[e] * b[e];
}

template <typename T>
S2META_ALWAYS_INLINE void cell_backward(int64_t HB, const T* __restrict__ gi, const T* __restrict__ gf,
                                        const T* __restrict__ gg, const T* __restrict__ go,
                                        const T* __restrict__ tanh_c, const T* __restrict__ c_prev,
                                        const T* __restrict__ du, const T* __restrict__ dc_in, T* __restrict__ dz,
                                        T* __restrict__ d_c) {
  for (int64_t e = 0; e < HB; ++e) {
    const T tc = tanh_c[e];
    const T i = gi[e], f = gf[e], g = gg[e], o = go[e];
    const T dc_tot = dc_in[e] + du[e] * o * (T(1) - tc * tc);
    dz[e] = dc_tot * g * i * (T(1) - i);
    dz[HB + e] = dc_tot * c_prev[e] * f * (T(1) - f);
    dz[2 * HB + e] = dc_tot * i * (T(1) - g * g);
    dz[3 * HB + e] = du[e] * tc * o * (T(1) - o);
    d_c[e] = dc_tot * f;
  }
}

// The two block products, in their AVX-512 form where the lanes are 64 bytes (float, H = 16).
template <typename T, int VB>
S2META_ALWAYS_INLINE void block_gemm(const T* A4, const T* bias, const T* X, int64_t M, int64_t Kd, T* out) {
#if S2META_GCC_VECTORS && S2META_ISA_CLONES
  if constexpr (VB == 64 && std::is_same_v<T, float> && kBlock == 16) {
    if (M % 8 == 0) return gemm_block_packed4_wide(A4, bias, X, M, Kd, out);
  }
#endif
  gemm_block_packed4<T, kBlock>(A4, bias, X, M, Kd, out);
}

template <typename T, int VB>
S2META_ALWAYS_INLINE void block_outer(T* acc, const T* dz, const T* x_t, int64_t M, int64_t FP) {
#if S2META_GCC_VECTORS && S2META_ISA_CLONES
  if constexpr (VB == 64 && std::is_same_v<T, float> && kBlock == 16) {
    if (FP == 24 && M % 8 == 0) return accumulate_outer_wide24(acc, dz, x_t, M);
  }
#endif
  accumulate_outer<T, kBlock>(acc, dz, x_t, M, FP);
}

// The block's [H][kBlock] result rows stored as the [kBlock][H] rows of the output tensors (h', c'
// in the forward, dh, dc in the backward). Float blocks of H = 16 in the AVX-512 build bypass the
// cache: each coordinate's row is one 64-byte line, written whole by a non-temporal store. A call
// writes S x N x H x 2 floats (11 MB at B = 8) into memory not in cache; ordinary stores first
// read every line (write-allocate) and evict the inputs the next blocks read. Measured in a
// 20-step chain at B = 8 on the dev VM: forward -10 %, backward -9 %.
#if S2META_GCC_VECTORS && S2META_ISA_CLONES
template <typename T, int HC, int VB>
constexpr bool kStreamsRows = VB == 64 && std::is_same_v<T, float> && HC == 16 && kBlock == 16;
#else
template <typename T, int HC, int VB>
constexpr bool kStreamsRows = false;
#endif

template <typename T, int HC, int VB>
S2META_ALWAYS_INLINE void store_rows(const T* block, T* dst, int64_t H, int nb) {
#if S2META_GCC_VECTORS && S2META_ISA_CLONES
  if constexpr (kStreamsRows<T, HC, VB>) {
    if (nb == kBlock && reinterpret_cast<uintptr_t>(dst) % 64 == 0)
      return transpose16x16_streaming(block, kBlock, dst, H);
  }
#endif
  transpose_block(block, kBlock, dst, H, H, nb);
}

// Non-temporal stores are weakly ordered: make them visible before the parallel region ends.
template <typename T, int HC, int VB>
S2META_ALWAYS_INLINE void streamed_rows_fence() {
#if defined(__x86_64__)
  if constexpr (kStreamsRows<T, HC, VB>) __builtin_ia32_sfence();
#endif
}

// Block t of a chunk: scenario s, first coordinate j0 and nb live lanes.
struct BlockAt {
  int64_t s, j0;
  int nb;
};

// Locates block t of a chunk, after prefetching the [kBlock, H] rows kPrefetchBlocks blocks ahead
// of the arrays the blocks read and of those they write (unless the results are streamed past
// the cache).
template <typename T, int HC, int VB>
S2META_ALWAYS_INLINE BlockAt enter_block(const Ctx<T>& ctx, const Chunk& ch, int64_t t,
                                         std::initializer_list<const T*> reads, std::initializer_list<T*> writes) {
  const int64_t H = HC ? HC : ctx.d.H, N = ctx.d.N;
  const int64_t lo = ctx.offsets[ch.k], hi = ctx.offsets[ch.k + 1];
  if (t + kPrefetchBlocks < ch.t_end) {
    const int64_t pb = block_base(ch, lo, N, t + kPrefetchBlocks) * H;
    for (const T* r : reads) prefetch_rows(r + pb, kBlock * H, false);
    if (!kStreamsRows<T, HC, VB>)
      for (T* w : writes) prefetch_rows(w + pb, kBlock * H, true);
  }
  const int64_t j0 = lo + (t % ch.blocks_per_row) * kBlock;
  return {t / ch.blocks_per_row, j0, static_cast<int>(std::min<int64_t>(kBlock, hi - j0))};
}

// Forward of one block: fills the scratch with every intermediate the backward needs. VB is the
// float vector width in bytes of the build it is compiled into.
template <typename T, int HC, int VB>
S2META_ALWAYS_INLINE void block_forward(const Ctx<T>& ctx, int64_t k, int64_t s, int64_t j0, int nb, Scratch<T>& sc) {
  const int64_t H = HC ? HC : ctx.d.H, G = 4 * H, F = lstm::kFeatures + H, N = ctx.d.N;
  const PreparedWeights<T>& w = *ctx.w;
  T* in = sc.in;
  const int64_t base = s * N + j0;
  if (nb == kBlock) {
    Act<T>::template clamp_copy<VB>(ctx.grad + base, ctx.clip, sc.g, kBlock);
    std::memcpy(sc.th, ctx.theta + base, sizeof(T) * kBlock);
  } else {
    for (int b = 0; b < kBlock; ++b) {
      const bool live = b < nb;
      sc.g[b] = live ? lstm::clamp_keep_nan(ctx.grad[base + b], ctx.clip) : T(0);
      sc.th[b] = live ? ctx.theta[base + b] : T(0);
    }
  }
  const T loss_feature = ctx.loss_feature[s];
  for (int b = 0; b < kBlock; ++b) in[4 * kBlock + b] = loss_feature;
  // The Eq. 12 features of g and theta: rows 0, 1 and 2, 3 of the block input.
  Act<T>::template preprocess<VB>(sc.g, kBlock, ctx.p, ctx.threshold, ctx.exp_p, in, in + kBlock);
  Act<T>::template preprocess<VB>(sc.th, kBlock, ctx.p, ctx.threshold, ctx.exp_p, in + 2 * kBlock, in + 3 * kBlock);
  if (nb == kBlock) {
    transpose_block(ctx.h + base * H, H, in + lstm::kFeatures * kBlock, kBlock, kBlock, H);
    transpose_block(ctx.c + base * H, H, sc.c_prev, kBlock, kBlock, H);
  } else {
    for (int b = 0; b < kBlock; ++b) {
      const bool live = b < nb;
      const T* h_row = ctx.h + (base + b) * H;
      const T* c_row = ctx.c + (base + b) * H;
      for (int64_t q = 0; q < H; ++q) {
        in[(lstm::kFeatures + q) * kBlock + b] = live ? h_row[q] : T(0);
        sc.c_prev[q * kBlock + b] = live ? c_row[q] : T(0);
      }
    }
  }

  T* act = sc.act;
  block_gemm<T, VB>(w.wpack.data() + k * G * F, w.bias.data() + k * G, in, G, F, act);
  const int64_t HB = H * kBlock;
  Act<T>::template sigmoid_inplace<VB>(act, 2 * HB);       // i, f
  Act<T>::template tanh_inplace<VB>(act + 2 * HB, HB);     // g
  Act<T>::template sigmoid_inplace<VB>(act + 3 * HB, HB);  // o
  const T* gi = act;
  const T* gf = act + HB;
  const T* gg = act + 2 * HB;
  const T* go = act + 3 * HB;
  cell_forward(HB, gi, gf, gg, sc.c_prev, sc.c_new, sc.tanh_c);
  Act<T>::template tanh_inplace<VB>(sc.tanh_c, HB);
  T* hn = sc.h_new;
  mul_into(HB, go, sc.tanh_c, hn);

  if (ctx.d.layer_norm) {
    const T* lw = w.ln_w + k * H;
    const T* lb = w.ln_b + k * H;
    T mean[kBlock], var[kBlock];
    for (int b = 0; b < kBlock; ++b) mean[b] = T(0);
    for (int64_t q = 0; q < H; ++q)
      for (int b = 0; b < kBlock; ++b) mean[b] += hn[q * kBlock + b];
    for (int b = 0; b < kBlock; ++b) {
      mean[b] /= T(H);
      var[b] = T(0);
    }
    for (int64_t q = 0; q < H; ++q)
      for (int b = 0; b < kBlock; ++b) {
        const T diff = hn[q * kBlock + b] - mean[b];
        var[b] += diff * diff;
      }
    for (int b = 0; b < kBlock; ++b) sc.rstd[b] = T(1) / std::sqrt(var[b] / T(H) + ctx.eps);
    for (int64_t q = 0; q < H; ++q)
      for (int b = 0; b < kBlock; ++b) {
        const T xh = (hn[q * kBlock + b] - mean[b]) * sc.rstd[b];
        sc.xhat[q * kBlock + b] = xh;
        hn[q * kBlock + b] = xh * lw[q] + lb[q];
      }
  }

  const T* wg = w.w_gate + k * 2 * H;
  T za[kBlock], zb[kBlock];
  for (int b = 0; b < kBlock; ++b) {
    za[b] = w.b_gate[2 * k];
    zb[b] = w.b_gate[2 * k + 1];
  }
  for (int64_t q = 0; q < H; ++q)
    for (int b = 0; b < kBlock; ++b) {
      za[b] += wg[q] * hn[q * kBlock + b];
      zb[b] += wg[H + q] * hn[q * kBlock + b];
    }
  Act<T>::template sigmoid_inplace<VB>(za, kBlock);
  Act<T>::template sigmoid_inplace<VB>(zb, kBlock);
  for (int b = 0; b < kBlock; ++b) {
    sc.alpha[b] = za[b];
    sc.beta[b] = zb[b];
  }
}

// add exactly nothing to the weight gradients.
template <typename T, int HC, int VB>
S2META_ALWAYS_INLINE void block_backward(const Ctx<T>& ctx, int64_t k, int64_t s, int64_t j0, int nb, Scratch<T>& sc,
                                         T* partial) {
  const int64_t H = HC ? HC : ctx.d.H, G = 4 * H, N = ctx.d.N, HB = H * kBlock;
  const int64_t FP = ctx.padded_features;
  const PreparedWeights<T>& w = *ctx.w;
  const int64_t base = s * N + j0;
  const T* wg = w.w_gate + k * 2 * H;

  // Heads: theta' = beta theta - alpha g, alpha = s(za), beta = s(zb).
  T dza[kBlock], dzb[kBlock];
  for (int b = 0; b < kBlock; ++b) {
    const bool live = b < nb;
    const T dtn = live ? ctx.d_theta_new[base + b] : T(0);
    const T da = (live ? ctx.d_alpha[base + b] : T(0)) - dtn * sc.g[b];
    const T db = (live ? ctx.d_beta[base + b] : T(0)) + dtn * sc.th[b];
    if (live) ctx.d_theta[base + b] = dtn * sc.beta[b];
    dza[b] = da * sc.alpha[b] * (T(1) - sc.alpha[b]);
    dzb[b] = db * sc.beta[b] * (T(1) - sc.beta[b]);
  }
  T* d_wg = sc.lane_sums + 2 * H * kBlock;
  T* d_bg = d_wg + 2 * H * kBlock;
  T* dh_tot = sc.dh_tot;
  if (nb == kBlock) {
    transpose_block(ctx.d_h_new + base * H, H, dh_tot, kBlock, kBlock, H);
  } else {
    for (int b = 0; b < kBlock; ++b) {
      const T* dh_row = ctx.d_h_new + (base + b) * H;
      for (int64_t q = 0; q < H; ++q) dh_tot[q * kBlock + b] = b < nb ? dh_row[q] : T(0);
    }
  }
  for (int64_t q = 0; q < H; ++q) {
    for (int b = 0; b < kBlock; ++b) {
      const T hv = sc.h_new[q * kBlock + b];
      d_wg[q * kBlock + b] += dza[b] * hv;
      d_wg[(H + q) * kBlock + b] += dzb[b] * hv;
      dh_tot[q * kBlock + b] += dza[b] * wg[q] + dzb[b] * wg[H + q];
    }
  }
  for (int b = 0; b < kBlock; ++b) {
    d_bg[b] += dza[b];
    d_bg[kBlock + b] += dzb[b];
  }

  // LayerNorm: du = rstd (dx - mean(dx) - xhat mean(dx xhat)), dx = dh' * gamma.
  T* du = dh_tot;  // overwritten in place
  if (ctx.d.layer_norm) {
    const T* lw = w.ln_w + k * H;
    T* d_lw = sc.lane_sums;
    T* d_lb = d_lw + H * kBlock;
    T m1[kBlock], m2[kBlock];
    for (int b = 0; b < kBlock; ++b) m1[b] = m2[b] = T(0);
    for (int64_t q = 0; q < H; ++q) {
      for (int b = 0; b < kBlock; ++b) {
        const T dy = dh_tot[q * kBlock + b];
        const T xh = sc.xhat[q * kBlock + b];
        d_lw[q * kBlock + b] += dy * xh;
        d_lb[q * kBlock + b] += dy;
        const T dx = dy * lw[q];
        dh_tot[q * kBlock + b] = dx;
        m1[b] += dx;
        m2[b] += dx * xh;
      }
    }
    for (int b = 0; b < kBlock; ++b) {
      m1[b] /= T(H);
      m2[b] /= T(H);
    }
    for (int64_t q = 0; q < H; ++q)
      for (int b = 0; b < kBlock; ++b) {
        const int64_t e = q * kBlock + b;
        du[e] = sc.rstd[b] * (dh_tot[e] - m1[b] - sc.xhat[e] * m2[b]);
      }
  }

  // Cell: u = o tanh(c'), c' = f c + i g; dz for the four gate pre-activations.
  const T* gi = sc.act;
  const T* gf = sc.act + HB;
  const T* gg = sc.act + 2 * HB;
  const T* go = sc.act + 3 * HB;
  T* dz = sc.dz;
  T* dc_in = sc.dh_out;  // holds d_c' until dh is computed
  if (nb == kBlock) {
    transpose_block(ctx.d_c_new + base * H, H, dc_in, kBlock, kBlock, H);
  } else {
    for (int b = 0; b < kBlock; ++b) {
      const T* dc_row = ctx.d_c_new + (base + b) * H;
      for (int64_t q = 0; q < H; ++q) dc_in[q * kBlock + b] = b < nb ? dc_row[q] : T(0);
    }
  }
  T* d_c = sc.dc_out;
  cell_backward(HB, gi, gf, gg, go, sc.tanh_c, sc.c_prev, du, dc_in, dz, d_c);
  T* dh = sc.dh_out;
  if (H % 4 == 0) {
    block_gemm<T, VB>(w.whh_t_pack.data() + k * H * G, w.zeros.data(), dz, H, G, dh);
  } else {
    gemm_block<T, kBlock>(w.whh_t.data() + k * H * G, nullptr, dz, H, G, dh);
  }
  store_rows<T, HC, VB>(dh, ctx.d_h + base * H, H, nb);
  store_rows<T, HC, VB>(d_c, ctx.d_c + base * H, H, nb);

  // dW[r][j] += sum_b dz[r][b] x[j][b] over x = [features, h, 1]: the constant column F gives
  // the bias gradient. Lane-major x rows make the inner loop a contiguous axpy over j. Columns
  // F (1) and above (0 padding) were set once by backward_range.
  T* in_t = sc.in_t;
  if (H % 8 == 0) {  // rows [0, 8) then [5, 5 + H): whole 8 x 8 tiles, columns 5..7 written twice
    transpose_block(sc.in, kBlock, in_t, FP, 8, kBlock);
  } else {
    for (int b = 0; b < kBlock; ++b) {
      T* row = in_t + b * FP;
      for (int64_t j = 0; j < lstm::kFeatures; ++j) row[j] = sc.in[j * kBlock + b];
    }
  }
  transpose_block(sc.in + lstm::kFeatures * kBlock, kBlock, in_t + lstm::kFeatures, FP, H, kBlock);
  block_outer<T, VB>(partial, dz, in_t, G, FP);
}

}  // namespace lstm_cpu
}  // namespace s2meta
