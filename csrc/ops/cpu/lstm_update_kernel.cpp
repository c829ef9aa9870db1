// lstm_update_multi on the CPU: the coordinatewise-LSTM step of docs/spec.md §3 (formula in ops/lstm_update.h) for
// every coordinate of S scenarios x K segments, and its fused backward.
//
// Coordinates are processed in blocks of kBlock that never straddle a segment (lstm_block.h).
// Blocks are grouped into chunks of one controller each, the unit of parallel work; the backward
// accumulates weight gradients per chunk and sums the chunks of each controller in a fixed order,
// so results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"
#include "ops/cpu/isa.h"
#include "ops/cpu/lstm_block.h"
#include "ops/grad_preprocess.h"
#include "ops/lstm_update.h"

namespace s2meta {
namespace {

using lstm::Dims;
using lstm_cpu::Chunk;
using lstm_cpu::Ctx;
using lstm_cpu::kBlock;
using lstm_cpu::PreparedWeights;
using lstm_cpu::Scratch;
using lstm_cpu::BlockAt;
using lstm_cpu::block_backward;
using lstm_cpu::block_forward;
using lstm_cpu::enter_block;
using lstm_cpu::store_rows;
using lstm_cpu::streamed_rows_fence;

constexpr int64_t kChunkBlocks = 64;  // blocks per chunk: the unit of parallel work

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

// The drivers: one thread's range of chunks, block after block.
template <typename T, int HC, int VB>
S2META_ALWAYS_INLINE void forward_range(const Ctx<T>& ctx, int64_t chunk_begin, int64_t chunk_end) {
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


template <typename T, int HC, int VB>
S2META_ALWAYS_INLINE void backward_range(const Ctx<T>& ctx, int64_t chunk_begin, int64_t chunk_end) {
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

// Three instantiations of each driver: the AVX-512 and AVX2+FMA clones and the baseline build,
// so the library runs on any x86-64 (or other) CPU; cpu::isa() picks one per process. The
// baseline keeps the 32-byte lanes of the AVX2 clone. Each is compiled for H = 16 (the paper's
// hidden size: every loop bound a constant) and for any H.
template <typename T, int HC>
void forward_range_base(const Ctx<T>& ctx, int64_t b, int64_t e) {
  forward_range<T, HC, 32>(ctx, b, e);
}
template <typename T, int HC>
void backward_range_base(const Ctx<T>& ctx, int64_t b, int64_t e) {
  backward_range<T, HC, 32>(ctx, b, e);
}
#if S2META_ISA_CLONES
template <typename T, int HC>
S2META_TARGET_AVX2 void forward_range_avx2(const Ctx<T>& ctx, int64_t b, int64_t e) {
  forward_range<T, HC, 32>(ctx, b, e);
}
template <typename T, int HC>
S2META_TARGET_AVX2 void backward_range_avx2(const Ctx<T>& ctx, int64_t b, int64_t e) {
  backward_range<T, HC, 32>(ctx, b, e);
}
template <typename T, int HC>
S2META_TARGET_AVX512 void forward_range_avx512(const Ctx<T>& ctx, int64_t b, int64_t e) {
  forward_range<T, HC, 64>(ctx, b, e);
}
template <typename T, int HC>
S2META_TARGET_AVX512 void backward_range_avx512(const Ctx<T>& ctx, int64_t b, int64_t e) {
  backward_range<T, HC, 64>(ctx, b, e);
}
#endif

template <typename T, int HC>
void forward_dispatch_h(cpu::Isa isa, const Ctx<T>& ctx, int64_t b, int64_t e) {
#if S2META_ISA_CLONES
  if (isa == cpu::Isa::kAvx512) return forward_range_avx512<T, HC>(ctx, b, e);
  if (isa == cpu::Isa::kAvx2) return forward_range_avx2<T, HC>(ctx, b, e);
#endif
  forward_range_base<T, HC>(ctx, b, e);
}

template <typename T, int HC>
void backward_dispatch_h(cpu::Isa isa, const Ctx<T>& ctx, int64_t b, int64_t e) {
#if S2META_ISA_CLONES
  if (isa == cpu::Isa::kAvx512) return backward_range_avx512<T, HC>(ctx, b, e);
  if (isa == cpu::Isa::kAvx2) return backward_range_avx2<T, HC>(ctx, b, e);
#endif
  backward_range_base<T, HC>(ctx, b, e);
}

template <typename T>
void forward_dispatch(cpu::Isa isa, const Ctx<T>& ctx, int64_t b, int64_t e) {
  if (ctx.d.H == 16) return forward_dispatch_h<T, 16>(isa, ctx, b, e);
  forward_dispatch_h<T, 0>(isa, ctx, b, e);
}

template <typename T>
void backward_dispatch(cpu::Isa isa, const Ctx<T>& ctx, int64_t b, int64_t e) {
  if (ctx.d.H == 16) return backward_dispatch_h<T, 16>(isa, ctx, b, e);
  backward_dispatch_h<T, 0>(isa, ctx, b, e);
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
  const cpu::Isa isa = cpu::isa();
  AT_DISPATCH_FLOATING_TYPES(in.theta.scalar_type(), "lstm_update_multi_cpu", [&] {
    const PreparedWeights<scalar_t> w(d, in, false);
    Ctx<scalar_t> ctx;
    fill_common(ctx, d, offsets, chunks, w, in, p, clip);
    ctx.theta_new = out.theta_new.mutable_data_ptr<scalar_t>();
    ctx.h_new = out.h_new.mutable_data_ptr<scalar_t>();
    ctx.c_new = out.c_new.mutable_data_ptr<scalar_t>();
    ctx.alpha_out = out.alpha.mutable_data_ptr<scalar_t>();
    ctx.beta_out = out.beta.mutable_data_ptr<scalar_t>();
    parallel_over_chunks(chunks, [&](int64_t b, int64_t e) { forward_dispatch(isa, ctx, b, e); });
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
  const cpu::Isa isa = cpu::isa();

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
    parallel_over_chunks(chunks, [&](int64_t b, int64_t e) { backward_dispatch(isa, ctx, b, e); });

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
