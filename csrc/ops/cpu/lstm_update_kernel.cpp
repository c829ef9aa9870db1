// lstm_update_multi on the CPU: the coordinatewise-LSTM step of SPEC §3 (formula in
// ops/lstm_update.h) for every coordinate of S scenarios x K segments, and its fused backward,
// which recomputes the forward's intermediates instead of storing them.
//
// Layout: coordinates are processed in blocks of kBlock that never straddle a segment, stored
// feature-major ([row][lane]) so the 4H x (5+H) matvec becomes a register-blocked GEMM and
// every activation a flat loop the compiler vectorises. Blocks are grouped into chunks of one
// controller each; the backward accumulates weight gradients per chunk and sums the chunks of
// each controller in a fixed order, so results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops/cpu/lstm_update_math.h"
#include "ops/grad_preprocess.h"
#include "ops/lstm_update.h"

namespace s2meta {
namespace {

using lstm::Dims;
using lstm_cpu::Act;
using lstm_cpu::gemm_block;

constexpr int kBlock = 16;            // coordinates per block (lanes)
constexpr int64_t kChunkBlocks = 64;  // blocks per chunk: the unit of parallel work

// A run of blocks [t_begin, t_end) of controller k; block t covers scenario t / blocks_per_row,
// coordinates offsets[k] + (t % blocks_per_row) * kBlock onwards.
struct Chunk {
  int64_t k, t_begin, t_end, blocks_per_row;
};

// A chunk never spans two scenarios, so each weight-gradient partial (summed in chunk order) holds
// one scenario's terms: dropping a scenario whose upstream gradient is zero (the inner loop's
// compact mode) removes only zero partials and leaves the sums bit for bit unchanged.
std::vector<Chunk> make_chunks(const Dims& d, at::IntArrayRef offsets) {
  std::vector<Chunk> chunks;
  for (int64_t k = 0; k < d.K; ++k) {
    const int64_t n = offsets[k + 1] - offsets[k];
    const int64_t per_row = (n + kBlock - 1) / kBlock;
    for (int64_t s = 0; s < d.S; ++s) {
      const int64_t row_end = (s + 1) * per_row;
      for (int64_t t = s * per_row; t < row_end; t += kChunkBlocks)
        chunks.push_back({k, t, std::min(row_end, t + kChunkBlocks), per_row});
    }
  }
  return chunks;
}

// Runs fn(chunk_begin, chunk_end) over the chunks in parallel with the threads' shares balanced by
// blocks, not by chunk count: the small tensors' chunks are short, and an even split of the chunk
// list left one of two threads idle ~10% of the time. A thread takes the chunks that start in its
// range of blocks; each chunk still has its own partial sums, so results do not depend on threads.
template <typename Fn>
void parallel_over_chunks(const std::vector<Chunk>& chunks, const Fn& fn) {
  std::vector<int64_t> first_block(chunks.size() + 1, 0);
  for (size_t ci = 0; ci < chunks.size(); ++ci)
    first_block[ci + 1] = first_block[ci] + (chunks[ci].t_end - chunks[ci].t_begin);
  at::parallel_for(0, first_block.back(), kChunkBlocks, [&](int64_t begin, int64_t end) {
    const auto lo = std::lower_bound(first_block.begin(), first_block.end() - 1, begin);
    const auto hi = std::lower_bound(first_block.begin(), first_block.end() - 1, end);
    if (lo < hi) fn(lo - first_block.begin(), hi - first_block.begin());
  });
}

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
S2META_INLINE void prefetch_rows(const T* p, int64_t count, bool write) {
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
S2META_INLINE int64_t block_base(const Chunk& ch, int64_t lo, int64_t N, int64_t t) {
  return (t / ch.blocks_per_row) * N + lo + (t % ch.blocks_per_row) * kBlock;
}

// The elementwise cell loops, as functions of restrict pointers: the scratch arrays share one
// allocation, and without the promise GCC leaves these loops scalar.
template <typename T>
S2META_INLINE void cell_forward(int64_t n, const T* __restrict__ gi, const T* __restrict__ gf,
                                const T* __restrict__ gg, const T* __restrict__ c_prev, T* __restrict__ c_new,
                                T* __restrict__ tanh_c) {
  for (int64_t e = 0; e < n; ++e) {
    const T c = gf[e] * c_prev[e] + gi[e] * gg[e];
    c_new[e] = c;
    tanh_c[e] = c;
  }
}

template <typename T>
S2META_INLINE void mul_into(int64_t n, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out) {
  for (int64_t e = 0; e < n; ++e) out[e] = a[e] * b[e];
}

template <typename T>
S2META_INLINE void cell_backward(int64_t HB, const T* __restrict__ gi, const T* __restrict__ gf,
                                 const T* __restrict__ gg, const T* __restrict__ go, const T* __restrict__ tanh_c,
                                 const T* __restrict__ c_prev, const T* __restrict__ du,
                                 const T* __restrict__ dc_in, T* __restrict__ dz, T* __restrict__ d_c) {
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
S2META_INLINE void block_gemm(const T* A4, const T* bias, const T* X, int64_t M, int64_t Kd, T* out) {
#ifdef S2META_VECTOR_ACTIVATIONS
  if constexpr (VB == 64 && std::is_same_v<T, float> && kBlock == 16) {
    if (M % 8 == 0) return lstm_cpu::gemm_block_packed4_wide(A4, bias, X, M, Kd, out);
  }
#endif
  lstm_cpu::gemm_block_packed4<T, kBlock>(A4, bias, X, M, Kd, out);
}

template <typename T, int VB>
S2META_INLINE void block_outer(T* acc, const T* dz, const T* x_t, int64_t M, int64_t FP) {
#ifdef S2META_VECTOR_ACTIVATIONS
  if constexpr (VB == 64 && std::is_same_v<T, float> && kBlock == 16) {
    if (FP == 24 && M % 8 == 0) return lstm_cpu::accumulate_outer_wide24(acc, dz, x_t, M);
  }
#endif
  lstm_cpu::accumulate_outer<T, kBlock>(acc, dz, x_t, M, FP);
}

// The block's [H][kBlock] result rows stored as the [kBlock][H] rows of the output tensors (h', c'
// in the forward, dh, dc in the backward). Float blocks of H = 16 in the AVX-512 build bypass the
// cache: each coordinate's row is one 64-byte line, written whole by a non-temporal store. A call
// writes S x N x H x 2 floats (11 MB at B = 8) into memory not in cache; ordinary stores first
// read every line (write-allocate) and evict the inputs the next blocks read. Measured in a
// 20-step chain at B = 8 on the dev VM: forward -10 %, backward -9 %.
#ifdef S2META_VECTOR_ACTIVATIONS
template <typename T, int HC, int VB>
constexpr bool kStreamsRows = VB == 64 && std::is_same_v<T, float> && HC == 16 && kBlock == 16;
#else
template <typename T, int HC, int VB>
constexpr bool kStreamsRows = false;
#endif

template <typename T, int HC, int VB>
S2META_INLINE void store_rows(const T* block, T* dst, int64_t H, int nb) {
#ifdef S2META_VECTOR_ACTIVATIONS
  if constexpr (kStreamsRows<T, HC, VB>) {
    if (nb == kBlock && reinterpret_cast<uintptr_t>(dst) % 64 == 0)
      return lstm_cpu::transpose16x16_streaming(block, kBlock, dst, H);
  }
#endif
  lstm_cpu::transpose_block(block, kBlock, dst, H, H, nb);
}

// Non-temporal stores are weakly ordered: make them visible before the parallel region ends.
template <typename T, int HC, int VB>
S2META_INLINE void streamed_rows_fence() {
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
S2META_INLINE BlockAt enter_block(const Ctx<T>& ctx, const Chunk& ch, int64_t t, std::initializer_list<const T*> reads,
                                  std::initializer_list<T*> writes) {
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
S2META_INLINE void block_forward(const Ctx<T>& ctx, int64_t k, int64_t s, int64_t j0, int nb, Scratch<T>& sc) {
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
    lstm_cpu::transpose_block(ctx.h + base * H, H, in + lstm::kFeatures * kBlock, kBlock, kBlock, H);
    lstm_cpu::transpose_block(ctx.c + base * H, H, sc.c_prev, kBlock, kBlock, H);
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

template <typename T, int HC, int VB>
S2META_INLINE void forward_range(const Ctx<T>& ctx, int64_t chunk_begin, int64_t chunk_end) {
  const int64_t H = HC ? HC : ctx.d.H, N = ctx.d.N;
  Scratch<T> sc(H, 0);
  for (int64_t ci = chunk_begin; ci < chunk_end; ++ci) {
    const Chunk& ch = ctx.chunks[ci];
    for (int64_t t = ch.t_begin; t < ch.t_end; ++t) {
      const BlockAt at = enter_block<T, HC, VB>(ctx, ch, t, {ctx.h, ctx.c}, {ctx.h_new, ctx.c_new});
      block_forward<T, HC, VB>(ctx, ch.k, at.s, at.j0, at.nb, sc);
      const int64_t base = at.s * N + at.j0;
      for (int b = 0; b < at.nb; ++b) {
        ctx.theta_new[base + b] = sc.beta[b] * sc.th[b] - sc.alpha[b] * sc.g[b];
        ctx.alpha_out[base + b] = sc.alpha[b];
        ctx.beta_out[base + b] = sc.beta[b];
      }
      store_rows<T, HC, VB>(sc.h_new, ctx.h_new + base * H, H, at.nb);
      store_rows<T, HC, VB>(sc.c_new, ctx.c_new + base * H, H, at.nb);
    }
  }
  streamed_rows_fence<T, HC, VB>();
}

// Backward of one block, after block_forward. Lanes >= nb get zero incoming gradients, so they
// add exactly nothing to the weight gradients.
template <typename T, int HC, int VB>
S2META_INLINE void block_backward(const Ctx<T>& ctx, int64_t k, int64_t s, int64_t j0, int nb, Scratch<T>& sc,
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
    lstm_cpu::transpose_block(ctx.d_h_new + base * H, H, dh_tot, kBlock, kBlock, H);
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
    lstm_cpu::transpose_block(ctx.d_c_new + base * H, H, dc_in, kBlock, kBlock, H);
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
    lstm_cpu::transpose_block(sc.in, kBlock, in_t, FP, 8, kBlock);
  } else {
    for (int b = 0; b < kBlock; ++b) {
      T* row = in_t + b * FP;
      for (int64_t j = 0; j < lstm::kFeatures; ++j) row[j] = sc.in[j * kBlock + b];
    }
  }
  lstm_cpu::transpose_block(sc.in + lstm::kFeatures * kBlock, kBlock, in_t + lstm::kFeatures, FP, H, kBlock);
  block_outer<T, VB>(partial, dz, in_t, G, FP);
}

template <typename T, int HC, int VB>
S2META_INLINE void backward_range(const Ctx<T>& ctx, int64_t chunk_begin, int64_t chunk_end) {
  Scratch<T> sc(ctx.d.H, ctx.padded_features);
  const int64_t H = HC ? HC : ctx.d.H;
  const int64_t F = lstm::kFeatures + H, FP = ctx.padded_features;
  for (int b = 0; b < kBlock; ++b) {
    T* row = sc.in_t + b * FP;
    row[F] = T(1);
    for (int64_t j = F + 1; j < FP; ++j) row[j] = T(0);
  }
  for (int64_t ci = chunk_begin; ci < chunk_end; ++ci) {
    const Chunk& ch = ctx.chunks[ci];
    T* partial = ctx.partials + ci * ctx.partial_stride;
    std::fill(partial, partial + ctx.partial_stride, T(0));  // here, not up front: it stays in cache
    const int64_t small_rows = 4 * H + 2;
    std::fill(sc.lane_sums, sc.lane_sums + small_rows * kBlock, T(0));
    for (int64_t t = ch.t_begin; t < ch.t_end; ++t) {
      const BlockAt at =
          enter_block<T, HC, VB>(ctx, ch, t, {ctx.h, ctx.c, ctx.d_h_new, ctx.d_c_new}, {ctx.d_h, ctx.d_c});
      block_forward<T, HC, VB>(ctx, ch.k, at.s, at.j0, at.nb, sc);
      block_backward<T, HC, VB>(ctx, ch.k, at.s, at.j0, at.nb, sc, partial);
    }
    T* tail = partial + 4 * H * FP;  // G * FP: where the small weights' gradients start
    for (int64_t row = 0; row < small_rows; ++row) {
      T sum = T(0);
      for (int b = 0; b < kBlock; ++b) sum += sc.lane_sums[row * kBlock + b];
      tail[row] = sum;
    }
  }
  streamed_rows_fence<T, HC, VB>();
}

// Three instantiations of each driver: AVX-512 and AVX2+FMA clones, picked at run time when the
// CPU has them, and a baseline one, so the library still runs on any x86-64 (or other) CPU. Each
// is compiled for H = 16 (the paper's hidden size: every loop bound a constant) and for any H.
template <typename T, int HC>
void forward_range_base(const Ctx<T>& ctx, int64_t b, int64_t e) {
  forward_range<T, HC, 32>(ctx, b, e);
}
template <typename T, int HC>
void backward_range_base(const Ctx<T>& ctx, int64_t b, int64_t e) {
  backward_range<T, HC, 32>(ctx, b, e);
}
#if defined(__GNUC__) && defined(__x86_64__)
#define S2META_HAVE_AVX2_CLONE 1
#define S2META_AVX512_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
template <typename T, int HC>
__attribute__((target("avx2,fma"))) void forward_range_avx2(const Ctx<T>& ctx, int64_t b, int64_t e) {
  forward_range<T, HC, 32>(ctx, b, e);
}
template <typename T, int HC>
__attribute__((target("avx2,fma"))) void backward_range_avx2(const Ctx<T>& ctx, int64_t b, int64_t e) {
  backward_range<T, HC, 32>(ctx, b, e);
}
template <typename T, int HC>
__attribute__((target(S2META_AVX512_TARGET))) void forward_range_avx512(const Ctx<T>& ctx, int64_t b, int64_t e) {
  forward_range<T, HC, 64>(ctx, b, e);
}
template <typename T, int HC>
__attribute__((target(S2META_AVX512_TARGET))) void backward_range_avx512(const Ctx<T>& ctx, int64_t b, int64_t e) {
  backward_range<T, HC, 64>(ctx, b, e);
}
// 0: baseline, 1: AVX2+FMA, 2: AVX-512. S2META_CPU_BASELINE=1 forces the baseline build, so tests
// can cover it on an AVX2 machine; S2META_CPU_NO_AVX512=1 caps it at AVX2.
int cpu_level() {
  static const int level = [] {
    if (std::getenv("S2META_CPU_BASELINE") != nullptr) return 0;
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
    if (std::getenv("S2META_CPU_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq"))
      return 2;
    return 1;
  }();
  return level;
}
#endif

template <typename T, int HC>
void forward_dispatch_h(const Ctx<T>& ctx, int64_t b, int64_t e) {
#ifdef S2META_HAVE_AVX2_CLONE
  const int level = cpu_level();
  if (level == 2) return forward_range_avx512<T, HC>(ctx, b, e);
  if (level == 1) return forward_range_avx2<T, HC>(ctx, b, e);
#endif
  forward_range_base<T, HC>(ctx, b, e);
}

template <typename T, int HC>
void backward_dispatch_h(const Ctx<T>& ctx, int64_t b, int64_t e) {
#ifdef S2META_HAVE_AVX2_CLONE
  const int level = cpu_level();
  if (level == 2) return backward_range_avx512<T, HC>(ctx, b, e);
  if (level == 1) return backward_range_avx2<T, HC>(ctx, b, e);
#endif
  backward_range_base<T, HC>(ctx, b, e);
}

template <typename T>
void forward_dispatch(const Ctx<T>& ctx, int64_t b, int64_t e) {
  if (ctx.d.H == 16) return forward_dispatch_h<T, 16>(ctx, b, e);
  forward_dispatch_h<T, 0>(ctx, b, e);
}

template <typename T>
void backward_dispatch(const Ctx<T>& ctx, int64_t b, int64_t e) {
  if (ctx.d.H == 16) return backward_dispatch_h<T, 16>(ctx, b, e);
  backward_dispatch_h<T, 0>(ctx, b, e);
}

template <typename T>
std::vector<T> loss_features(const at::Tensor& loss, T p, T threshold, T exp_p) {
  const T* lp = loss.const_data_ptr<T>();
  std::vector<T> out(loss.numel());
  for (int64_t s = 0; s < loss.numel(); ++s) {
    T unused;
    preprocess_scalar(lp[s], p, threshold, exp_p, &out[s], &unused);
  }
  return out;
}

template <typename T>
void fill_common(Ctx<T>& ctx, const Dims& d, at::IntArrayRef offsets, const std::vector<Chunk>& chunks,
                 const PreparedWeights<T>& w, const lstm::Inputs& in, double p, double clip) {
  ctx.d = d;
  ctx.offsets = offsets.data();
  ctx.chunks = chunks.data();
  ctx.w = &w;
  ctx.theta = in.theta.const_data_ptr<T>();
  ctx.grad = in.grad.const_data_ptr<T>();
  ctx.h = in.h.const_data_ptr<T>();
  ctx.c = in.c.const_data_ptr<T>();
  ctx.p = static_cast<T>(p);
  ctx.threshold = static_cast<T>(std::exp(-p));
  ctx.exp_p = static_cast<T>(std::exp(p));
  ctx.loss_feature_values = loss_features<T>(in.loss, ctx.p, ctx.threshold, ctx.exp_p);
  ctx.loss_feature = ctx.loss_feature_values.data();
  ctx.clip = static_cast<T>(clip);
  ctx.eps = static_cast<T>(lstm::kLayerNormEps);
}

using OutputTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

OutputTuple lstm_update_multi_cpu(const at::Tensor& theta_in, const at::Tensor& grad_in, const at::Tensor& loss_in,
                              const at::Tensor& h_in, const at::Tensor& c_in, at::IntArrayRef offsets,
                              const at::Tensor& w_ih_in, const at::Tensor& w_hh_in, const at::Tensor& b_ih_in,
                              const at::Tensor& b_hh_in, const std::optional<at::Tensor>& ln_weight,
                              const std::optional<at::Tensor>& ln_bias, const at::Tensor& w_gate_in,
                              const at::Tensor& b_gate_in, double p, double clip) {
  const Dims d = lstm::check_multi_args("lstm_update_multi", theta_in, grad_in, loss_in, h_in, c_in, offsets, w_ih_in,
                                        w_hh_in, b_ih_in, b_hh_in, ln_weight, ln_bias, w_gate_in, b_gate_in, p, clip);
  const lstm::Inputs in = lstm::contiguous_inputs(theta_in, grad_in, loss_in, h_in, c_in, w_ih_in, w_hh_in, b_ih_in,
                                                  b_hh_in, ln_weight, ln_bias, w_gate_in, b_gate_in);
  lstm::Outputs out(in);
  if (in.theta.numel() == 0) return out.as_tuple();
  const std::vector<Chunk> chunks = make_chunks(d, offsets);
  AT_DISPATCH_FLOATING_TYPES(in.theta.scalar_type(), "lstm_update_multi_cpu", [&] {
    const PreparedWeights<scalar_t> w(d, in, false);
    Ctx<scalar_t> ctx;
    fill_common(ctx, d, offsets, chunks, w, in, p, clip);
    ctx.theta_new = out.theta_new.mutable_data_ptr<scalar_t>();
    ctx.h_new = out.h_new.mutable_data_ptr<scalar_t>();
    ctx.c_new = out.c_new.mutable_data_ptr<scalar_t>();
    ctx.alpha_out = out.alpha.mutable_data_ptr<scalar_t>();
    ctx.beta_out = out.beta.mutable_data_ptr<scalar_t>();
    parallel_over_chunks(chunks, [&](int64_t b, int64_t e) { forward_dispatch(ctx, b, e); });
  });
  return out.as_tuple();
}

lstm::GradientTuple lstm_update_multi_backward_cpu(
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
  const lstm::Inputs in = lstm::contiguous_inputs(theta_in, grad_in, loss_in, h_in, c_in, w_ih_in, w_hh_in, b_ih_in,
                                                  b_hh_in, ln_weight, ln_bias, w_gate_in, b_gate_in);
  const lstm::OutputGrads up =
      lstm::contiguous_output_grads(d_theta_new_in, d_h_new_in, d_c_new_in, d_alpha_in, d_beta_in);

  const int64_t H = d.H, G = 4 * H, F = lstm::kFeatures + H;
  const int64_t FP = (F + 1 + 7) / 8 * 8;  // + the bias column, rounded to a vector multiple
  const int64_t P = G * FP + 4 * H + 2;     // dW | d ln_w | d ln_b | d w_gate | d b_gate

  lstm::InputGrads g(d, in);
  if (in.theta.numel() == 0) return g.as_tuple();
  const std::vector<Chunk> chunks = make_chunks(d, offsets);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  at::Tensor partials = at::empty({n_chunks, P}, in.theta.options());  // each chunk zeroes its own row

  AT_DISPATCH_FLOATING_TYPES(in.theta.scalar_type(), "lstm_update_multi_backward_cpu", [&] {
    const PreparedWeights<scalar_t> w(d, in, true);
    Ctx<scalar_t> ctx;
    fill_common(ctx, d, offsets, chunks, w, in, p, clip);
    ctx.d_theta_new = up.d_theta_new.const_data_ptr<scalar_t>();
    ctx.d_h_new = up.d_h_new.const_data_ptr<scalar_t>();
    ctx.d_c_new = up.d_c_new.const_data_ptr<scalar_t>();
    ctx.d_alpha = up.d_alpha.const_data_ptr<scalar_t>();
    ctx.d_beta = up.d_beta.const_data_ptr<scalar_t>();
    ctx.d_theta = g.d_theta.mutable_data_ptr<scalar_t>();
    ctx.d_h = g.d_h.mutable_data_ptr<scalar_t>();
    ctx.d_c = g.d_c.mutable_data_ptr<scalar_t>();
    ctx.partials = partials.mutable_data_ptr<scalar_t>();
    ctx.partial_stride = P;
    ctx.padded_features = FP;
    parallel_over_chunks(chunks, [&](int64_t b, int64_t e) { backward_dispatch(ctx, b, e); });

    // Sum each controller's chunks in chunk order: the result is independent of the threads.
    std::vector<scalar_t> total(d.K * P, scalar_t(0));
    const scalar_t* part = partials.const_data_ptr<scalar_t>();
    std::vector<int64_t> first_chunk(d.K + 1, n_chunks);
    for (int64_t ci = n_chunks - 1; ci >= 0; --ci) first_chunk[chunks[ci].k] = ci;
    for (int64_t k = d.K - 1; k >= 0; --k) first_chunk[k] = std::min(first_chunk[k], first_chunk[k + 1]);
    // Serial: it is ~P adds per chunk, and on a busy machine one more parallel region costs more
    // in thread wake-ups than it saves.
    for (int64_t k = 0; k < d.K; ++k) {
      scalar_t* tk = total.data() + k * P;
      for (int64_t ci = first_chunk[k]; ci < first_chunk[k + 1]; ++ci) {
        const scalar_t* row = part + ci * P;
        for (int64_t slot = 0; slot < P; ++slot) tk[slot] += row[slot];
      }
    }

    scalar_t* gwi = g.d_w_ih.mutable_data_ptr<scalar_t>();
    scalar_t* gwh = g.d_w_hh.mutable_data_ptr<scalar_t>();
    scalar_t* gbi = g.d_b_ih.mutable_data_ptr<scalar_t>();
    scalar_t* gbh = g.d_b_hh.mutable_data_ptr<scalar_t>();
    scalar_t* gwg = g.d_w_gate.mutable_data_ptr<scalar_t>();
    scalar_t* gbg = g.d_b_gate.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < d.K; ++k) {
      const scalar_t* tk = total.data() + k * P;
      for (int64_t r = 0; r < G; ++r) {
        for (int64_t j = 0; j < lstm::kFeatures; ++j) gwi[(k * G + r) * lstm::kFeatures + j] = tk[r * FP + j];
        for (int64_t q = 0; q < H; ++q) gwh[(k * G + r) * H + q] = tk[r * FP + lstm::kFeatures + q];
        gbi[k * G + r] = tk[r * FP + F];
        gbh[k * G + r] = tk[r * FP + F];
      }
      const scalar_t* rest = tk + G * FP;
      if (d.layer_norm) {
        scalar_t* glw = g.d_ln_w.mutable_data_ptr<scalar_t>();
        scalar_t* glb = g.d_ln_b.mutable_data_ptr<scalar_t>();
        for (int64_t q = 0; q < H; ++q) {
          glw[k * H + q] = rest[q];
          glb[k * H + q] = rest[H + q];
        }
      }
      for (int64_t q = 0; q < 2 * H; ++q) gwg[k * 2 * H + q] = rest[2 * H + q];
      gbg[2 * k] = rest[4 * H];
      gbg[2 * k + 1] = rest[4 * H + 1];
    }
  });
  return g.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(s2meta, CPU, m) {
  m.impl("lstm_update_multi", &lstm_update_multi_cpu);
  m.impl("lstm_update_multi_backward", &lstm_update_multi_backward_cpu);
}

}  // namespace s2meta
