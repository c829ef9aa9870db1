// Activations and the small block GEMM of the CPU lstm_update kernel, written as plain loops
// over a block of B coordinates so that GCC vectorises them (AVX-512 / AVX2 in the target
// clones of the kernel, SSE2 otherwise).
//
// float: exp is a Cody-Waite reduction plus a degree-7 polynomial (error ~0.1 ulp before the
// final rounding), sigmoid/tanh are built on exp(-|x|) so nothing overflows, and tanh uses its
// Taylor series near 0 where (1 - e)/(1 + e) would cancel. Everything is branch-free selects,
// which is what lets the loops vectorise; NaN propagates through every path.
// double: the libm functions (exact to ~1 ulp; the fp64 path is for checking, not for speed).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ops/grad_preprocess.h"

#if defined(__GNUC__) && !defined(__clang__)
// The 32-byte lanes below never cross a non-inlined call boundary; GCC's ABI note is noise here.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__GNUC__)
#define S2META_INLINE inline __attribute__((always_inline))
#else
#define S2META_INLINE inline
#endif

namespace s2meta {
namespace lstm_cpu {

template <typename T>
struct Act;

// Written once over a generic lane type V (float, or a GCC vector of floats) so the scalar tail
// and the vector body compute the same formula; VI is the matching unsigned type (wrapping
// integer arithmetic, no UB on garbage lanes). GCC's auto-vectoriser will not if-convert the
// float compares and selects here (they may trap), hence the explicit vector type, whose `?:`
// is a lane-wise select.
template <typename V, typename VI>
struct FloatActImpl {
  static S2META_INLINE V bits_to_float(VI i) {
    V f;
    std::memcpy(&f, &i, sizeof(f));
    return f;
  }
  static S2META_INLINE VI float_to_bits(V f) {
    VI i;
    std::memcpy(&i, &f, sizeof(i));
    return i;
  }
  static S2META_INLINE V abs(V x) { return bits_to_float(float_to_bits(x) & 0x7fffffffu); }

  // e^x for x <= 0 (all the activations need); 0 below -87 where e^x leaves the normal range.
  static S2META_INLINE V exp_nonpositive(V x) {
    const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const V t = x * 1.44269504088896341f + magic;
    const V n = t - magic;
    const VI ni = float_to_bits(t) - float_to_bits(magic);
    // ln 2 split in two so that n * hi is exact for |n| < 2^15.
    V r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    V poly = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    poly = poly * r + 1.0f / 120.0f;
    poly = poly * r + 1.0f / 24.0f;
    poly = poly * r + 1.0f / 6.0f;
    poly = poly * r + 0.5f;
    poly = poly * r + 1.0f;
    poly = poly * r + 1.0f;
    const V result = poly * bits_to_float((ni + 127) << 23);
    return x < -87.0f ? V{} : result;
  }

  // ln x for positive normal finite x (Cephes logf: |error| < 1.5 ulp); other inputs give garbage
  // that the caller must not use (log_inplace recomputes those lanes with std::log).
  static S2META_INLINE V log_normal(V x) {
    const VI bits = float_to_bits(x);
    VI eb = bits >> 23;  // x = m 2^(eb - 126), m in [0.5, 1)
    V m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);
    const auto small = m < 0.707106781186547524f;  // m in [0.5, sqrt(1/2)): use 2m and eb - 1
    eb = small ? eb - 1 : eb;
    m = small ? m + m - 1.0f : m - 1.0f;
    V ef;
    if constexpr (std::is_same_v<V, float>) {
      ef = static_cast<float>(eb) - 126.0f;
    } else {
      ef = __builtin_convertvector(eb, V) - 126.0f;
    }
    const V z = m * m;
    V y = m * 7.0376836292e-2f - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y = y + ef * -2.12194440e-4f;
    y = y - 0.5f * z;
    return m + y + ef * 0.693359375f;
  }

  static S2META_INLINE V sigmoid(V z) {
    const V e = exp_nonpositive(-abs(z));
    const V r = 1.0f / (1.0f + e);
    return z >= 0.0f ? r : e * r;  // NaN: the compare is false and e * r is NaN
  }

  static S2META_INLINE V tanh(V x) {
    const V a = abs(x);
    const V e = exp_nonpositive(-2.0f * a);
    const V large = (1.0f - e) / (1.0f + e);
    // Near 0, (1 - e)/(1 + e) cancels; Taylor to x^11 has relative error < 3e-9 for |x| < 0.3125.
    const V x2 = x * x;
    V poly = x2 * (-1382.0f / 155925.0f) + 62.0f / 2835.0f;
    poly = poly * x2 - 17.0f / 315.0f;
    poly = poly * x2 + 2.0f / 15.0f;
    poly = poly * x2 - 1.0f / 3.0f;
    const V small = x + x * x2 * poly;
    const V signed_large = x < 0.0f ? -large : large;
    return a < 0.3125f ? small : signed_large;
  }
};

#if defined(__GNUC__) && !defined(__clang__)
#define S2META_VECTOR_ACTIVATIONS 1

typedef float FloatLanes __attribute__((vector_size(32)));
typedef uint32_t IntLanes __attribute__((vector_size(32)));
constexpr int kFloatLanes = 8;

// Lanes of VB bytes: 32 in the AVX2 and baseline builds, 64 in the AVX-512 one (a block row of
// 16 floats is then one register, which halves the instruction count of every loop below).
// Spelled out per width: GCC drops vector_size from a typedef that depends on a template parameter.
typedef float FloatLanes16 __attribute__((vector_size(64)));
typedef uint32_t IntLanes16 __attribute__((vector_size(64)));
template <int VB>
struct FloatVec;
template <>
struct FloatVec<32> {
  using F = FloatLanes;
  using I = IntLanes;
  static constexpr int kLanes = 8;
  using Impl = FloatActImpl<F, I>;
};
template <>
struct FloatVec<64> {
  using F = FloatLanes16;
  using I = IntLanes16;
  static constexpr int kLanes = 16;
  using Impl = FloatActImpl<F, I>;
};
#endif

template <>
struct Act<float> {
  using Scalar = FloatActImpl<float, uint32_t>;
  static S2META_INLINE float sigmoid(float z) { return Scalar::sigmoid(z); }
  static S2META_INLINE float tanh(float x) { return Scalar::tanh(x); }

#ifdef S2META_VECTOR_ACTIVATIONS
#define S2META_APPLY_LANES(a, n, fn)                 \
  using L = FloatVec<VB>;                            \
  int64_t e = 0;                                     \
  for (; e + L::kLanes <= n; e += L::kLanes) {       \
    typename L::F v;                                 \
    std::memcpy(&v, a + e, sizeof(v));               \
    v = L::Impl::fn(v);                              \
    std::memcpy(a + e, &v, sizeof(v));               \
  }                                                  \
  for (; e < n; ++e) a[e] = Scalar::fn(a[e]);
#else
#define S2META_APPLY_LANES(a, n, fn) \
  for (int64_t e = 0; e < n; ++e) a[e] = Scalar::fn(a[e]);
#endif
  template <int VB = 32>
  static S2META_INLINE void sigmoid_inplace(float* a, int64_t n) { S2META_APPLY_LANES(a, n, sigmoid) }
  template <int VB = 32>
  static S2META_INLINE void tanh_inplace(float* a, int64_t n) { S2META_APPLY_LANES(a, n, tanh) }
#undef S2META_APPLY_LANES
  // dst = lstm::clamp_keep_nan(src, clip) (NaN stays NaN), as selects: no per-lane branches.
  // n is a multiple of the lane count.
  template <int VB = 32>
  static S2META_INLINE void clamp_copy(const float* src, float clip, float* dst, int64_t n) {
#ifdef S2META_VECTOR_ACTIVATIONS
    using L = FloatVec<VB>;
    for (int64_t e = 0; e < n; e += L::kLanes) {
      typename L::F v;
      std::memcpy(&v, src + e, sizeof(v));
      const typename L::F hi = typename L::F{} + clip;
      v = v < -hi ? -hi : (v > hi ? hi : v);
      std::memcpy(dst + e, &v, sizeof(v));
    }
#else
    for (int64_t e = 0; e < n; ++e) dst[e] = src[e] < -clip ? -clip : (src[e] > clip ? clip : src[e]);
#endif
  }

  // preprocess_scalar (ops/grad_preprocess.h) of x[0..n), n a multiple of the lane count, with
  // the logs taken by log_normal and lanes it does not cover (0, subnormal, inf) by std::log.
  template <int VB = 32>
  static S2META_INLINE void preprocess(const float* x, int64_t n, float p, float threshold, float exp_p,
                                       float* log_part, float* sign_part) {
#ifdef S2META_VECTOR_ACTIVATIONS
    using L = FloatVec<VB>;
    using V = typename L::F;
    for (int64_t e = 0; e < n; e += L::kLanes) {
      V v;
      std::memcpy(&v, x + e, sizeof(v));
      const V mag = L::Impl::abs(v);
      const auto big = mag >= threshold;  // false for NaN
      V lg = L::Impl::log_normal(mag) / p;
      const auto odd = big & ((mag < 1.17549435e-38f) | (mag > 3.40282347e+38f));
      bool any_odd = false;
      for (int l = 0; l < L::kLanes; ++l) any_odd |= odd[l] != 0;
      if (any_odd) {
        for (int l = 0; l < L::kLanes; ++l)
          if (odd[l]) lg[l] = std::log(mag[l]) / p;
      }
      const V one = V{} + 1.0f, zero = V{};
      const V sign = v > 0.0f ? one : (v < 0.0f ? -one : zero);
      const V lp = big ? lg : -one;
      const V sp = big ? sign : exp_p * v;
      std::memcpy(log_part + e, &lp, sizeof(lp));
      std::memcpy(sign_part + e, &sp, sizeof(sp));
    }
#else
    for (int64_t e = 0; e < n; ++e) preprocess_scalar(x[e], p, threshold, exp_p, &log_part[e], &sign_part[e]);
#endif
  }
};

template <>
struct Act<double> {
  static S2META_INLINE double sigmoid(double z) {
    const double e = std::exp(-std::fabs(z));
    const double r = 1.0 / (1.0 + e);
    return z >= 0.0 ? r : e * r;
  }
  static S2META_INLINE double tanh(double x) { return std::tanh(x); }
  // VB (the float lane width) is unused: fp64 is the checking path.
  template <int VB = 32>
  static S2META_INLINE void sigmoid_inplace(double* a, int64_t n) {
    for (int64_t e = 0; e < n; ++e) a[e] = sigmoid(a[e]);
  }
  template <int VB = 32>
  static S2META_INLINE void tanh_inplace(double* a, int64_t n) {
    for (int64_t e = 0; e < n; ++e) a[e] = std::tanh(a[e]);
  }
  template <int VB = 32>
  static S2META_INLINE void clamp_copy(const double* src, double clip, double* dst, int64_t n) {
    for (int64_t e = 0; e < n; ++e) dst[e] = src[e] < -clip ? -clip : (src[e] > clip ? clip : src[e]);
  }
  template <int VB = 32>
  static S2META_INLINE void preprocess(const double* x, int64_t n, double p, double threshold, double exp_p,
                                       double* log_part, double* sign_part) {
    for (int64_t e = 0; e < n; ++e) preprocess_scalar(x[e], p, threshold, exp_p, &log_part[e], &sign_part[e]);
  }
};

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < R, c < C: the row-major <->
// feature-major conversions of a block. float with R and C multiples of 8 goes through 8 x 8
// register transposes (unpack / shuffle / 128-bit lane swaps), everything else element by element.
template <typename T>
S2META_INLINE void transpose_block(const T* __restrict__ src, int64_t src_stride, T* __restrict__ dst,
                                   int64_t dst_stride, int64_t R, int64_t C) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
}

#ifdef S2META_VECTOR_ACTIVATIONS
S2META_INLINE void transpose8x8(const float* __restrict__ src, int64_t src_stride, float* __restrict__ dst,
                                int64_t dst_stride) {
  FloatLanes r0, r1, r2, r3, r4, r5, r6, r7;
  std::memcpy(&r0, src, 32);
  std::memcpy(&r1, src + src_stride, 32);
  std::memcpy(&r2, src + 2 * src_stride, 32);
  std::memcpy(&r3, src + 3 * src_stride, 32);
  std::memcpy(&r4, src + 4 * src_stride, 32);
  std::memcpy(&r5, src + 5 * src_stride, 32);
  std::memcpy(&r6, src + 6 * src_stride, 32);
  std::memcpy(&r7, src + 7 * src_stride, 32);
  const IntLanes lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const FloatLanes t0 = __builtin_shuffle(r0, r1, lo), t1 = __builtin_shuffle(r0, r1, hi);
  const FloatLanes t2 = __builtin_shuffle(r2, r3, lo), t3 = __builtin_shuffle(r2, r3, hi);
  const FloatLanes t4 = __builtin_shuffle(r4, r5, lo), t5 = __builtin_shuffle(r4, r5, hi);
  const FloatLanes t6 = __builtin_shuffle(r6, r7, lo), t7 = __builtin_shuffle(r6, r7, hi);
  const IntLanes plo = {0, 1, 8, 9, 4, 5, 12, 13}, phi = {2, 3, 10, 11, 6, 7, 14, 15};
  const FloatLanes u0 = __builtin_shuffle(t0, t2, plo), u1 = __builtin_shuffle(t0, t2, phi);
  const FloatLanes u2 = __builtin_shuffle(t1, t3, plo), u3 = __builtin_shuffle(t1, t3, phi);
  const FloatLanes u4 = __builtin_shuffle(t4, t6, plo), u5 = __builtin_shuffle(t4, t6, phi);
  const FloatLanes u6 = __builtin_shuffle(t5, t7, plo), u7 = __builtin_shuffle(t5, t7, phi);
  const IntLanes qlo = {0, 1, 2, 3, 8, 9, 10, 11}, qhi = {4, 5, 6, 7, 12, 13, 14, 15};
  const FloatLanes o0 = __builtin_shuffle(u0, u4, qlo), o4 = __builtin_shuffle(u0, u4, qhi);
  const FloatLanes o1 = __builtin_shuffle(u1, u5, qlo), o5 = __builtin_shuffle(u1, u5, qhi);
  const FloatLanes o2 = __builtin_shuffle(u2, u6, qlo), o6 = __builtin_shuffle(u2, u6, qhi);
  const FloatLanes o3 = __builtin_shuffle(u3, u7, qlo), o7 = __builtin_shuffle(u3, u7, qhi);
  std::memcpy(dst, &o0, 32);
  std::memcpy(dst + dst_stride, &o1, 32);
  std::memcpy(dst + 2 * dst_stride, &o2, 32);
  std::memcpy(dst + 3 * dst_stride, &o3, 32);
  std::memcpy(dst + 4 * dst_stride, &o4, 32);
  std::memcpy(dst + 5 * dst_stride, &o5, 32);
  std::memcpy(dst + 6 * dst_stride, &o6, 32);
  std::memcpy(dst + 7 * dst_stride, &o7, 32);
}

template <>
S2META_INLINE void transpose_block<float>(const float* __restrict__ src, int64_t src_stride, float* __restrict__ dst,
                                          int64_t dst_stride, int64_t R, int64_t C) {
  if (R % 8 != 0 || C % 8 != 0) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
    return;
  }
  for (int64_t r = 0; r < R; r += 8)
    for (int64_t c = 0; c < C; c += 8) transpose8x8(src + r * src_stride + c, src_stride, dst + c * dst_stride + r, dst_stride);
}
#endif

// out[m][b] = bias[m] (or 0) + sum_k A[m][k] X[k][b] for a block of B columns. Four rows at a
// time keep 4 * B accumulators in registers and load each X row once per four rows.
template <typename T, int B>
S2META_INLINE void gemm_block(const T* __restrict__ A, const T* __restrict__ bias, const T* __restrict__ X,
                              int64_t M, int64_t Kd, T* __restrict__ out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    T acc0[B], acc1[B], acc2[B], acc3[B];
    const T init0 = bias ? bias[m] : T(0), init1 = bias ? bias[m + 1] : T(0);
    const T init2 = bias ? bias[m + 2] : T(0), init3 = bias ? bias[m + 3] : T(0);
    for (int b = 0; b < B; ++b) {
      acc0[b] = init0;
      acc1[b] = init1;
      acc2[b] = init2;
      acc3[b] = init3;
    }
    const T* a0 = A + m * Kd;
    const T* a1 = a0 + Kd;
    const T* a2 = a1 + Kd;
    const T* a3 = a2 + Kd;
    for (int64_t k = 0; k < Kd; ++k) {
      const T* x = X + k * B;
      const T w0 = a0[k], w1 = a1[k], w2 = a2[k], w3 = a3[k];
      for (int b = 0; b < B; ++b) {
        acc0[b] += w0 * x[b];
        acc1[b] += w1 * x[b];
        acc2[b] += w2 * x[b];
        acc3[b] += w3 * x[b];
      }
    }
    for (int b = 0; b < B; ++b) {
      out[m * B + b] = acc0[b];
      out[(m + 1) * B + b] = acc1[b];
      out[(m + 2) * B + b] = acc2[b];
      out[(m + 3) * B + b] = acc3[b];
    }
  }
  for (; m < M; ++m) {
    T acc[B];
    const T init = bias ? bias[m] : T(0);
    for (int b = 0; b < B; ++b) acc[b] = init;
    for (int64_t k = 0; k < Kd; ++k) {
      const T w = A[m * Kd + k];
      for (int b = 0; b < B; ++b) acc[b] += w * X[k * B + b];
    }
    for (int b = 0; b < B; ++b) out[m * B + b] = acc[b];
  }
}

// As gemm_block for M a multiple of 4, with A packed as [M/4][Kd][4]: the four rows' weights for
// one k are adjacent, so the inner loop walks one pointer instead of four (fewer live registers).
template <typename T, int B>
S2META_INLINE void gemm_block_packed4(const T* __restrict__ A4, const T* __restrict__ bias, const T* __restrict__ X,
                                      int64_t M, int64_t Kd, T* __restrict__ out) {
  for (int64_t m = 0; m < M; m += 4) {
    T acc0[B], acc1[B], acc2[B], acc3[B];
    for (int b = 0; b < B; ++b) {
      acc0[b] = bias[m];
      acc1[b] = bias[m + 1];
      acc2[b] = bias[m + 2];
      acc3[b] = bias[m + 3];
    }
    const T* a = A4 + m * Kd;
    for (int64_t k = 0; k < Kd; ++k) {
      const T* x = X + k * B;
      const T w0 = a[4 * k], w1 = a[4 * k + 1], w2 = a[4 * k + 2], w3 = a[4 * k + 3];
      for (int b = 0; b < B; ++b) {
        acc0[b] += w0 * x[b];
        acc1[b] += w1 * x[b];
        acc2[b] += w2 * x[b];
        acc3[b] += w3 * x[b];
      }
    }
    for (int b = 0; b < B; ++b) {
      out[m * B + b] = acc0[b];
      out[(m + 1) * B + b] = acc1[b];
      out[(m + 2) * B + b] = acc2[b];
      out[(m + 3) * B + b] = acc3[b];
    }
  }
}

// acc[r][j] += sum_b dz[r][b] x_t[b][j] for r < M, j < FP (the weight-gradient outer products of
// a block): dz is [M][B], x_t is [B][FP], acc is [M][FP].
template <typename T, int B>
S2META_INLINE void accumulate_outer(T* __restrict__ acc, const T* __restrict__ dz, const T* __restrict__ x_t,
                                    int64_t M, int64_t FP) {
  for (int b = 0; b < B; ++b) {
    const T* x = x_t + b * FP;
    for (int64_t r = 0; r < M; ++r) {
      const T w = dz[r * B + b];
      T* row = acc + r * FP;
      for (int64_t j = 0; j < FP; ++j) row[j] += w * x[j];
    }
  }
}

#ifdef S2META_VECTOR_ACTIVATIONS
// float, FP a multiple of 8: a 4-row x 24-column tile (twelve vector accumulators) stays in
// registers across the B lanes. Twelve independent FMA chains hide the FMA latency (four, as
// before, left it latency-bound), and each lane costs 3 loads + 4 broadcasts per 12 FMAs.
template <>
S2META_INLINE void accumulate_outer<float, 16>(float* __restrict__ acc, const float* __restrict__ dz,
                                               const float* __restrict__ x_t, int64_t M, int64_t FP) {
  if (M % 4 != 0 || FP % kFloatLanes != 0) {
    for (int b = 0; b < 16; ++b)
      for (int64_t r = 0; r < M; ++r)
        for (int64_t j = 0; j < FP; ++j) acc[r * FP + j] += dz[r * 16 + b] * x_t[b * FP + j];
    return;
  }
  int64_t j = 0;
  for (; j + 3 * kFloatLanes <= FP; j += 3 * kFloatLanes) {
    for (int64_t r = 0; r < M; r += 4) {
      const float* d0 = dz + r * 16;
      float* o = acc + r * FP + j;
      FloatLanes c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32;
      std::memcpy(&c00, o, 32);
      std::memcpy(&c01, o + 8, 32);
      std::memcpy(&c02, o + 16, 32);
      std::memcpy(&c10, o + FP, 32);
      std::memcpy(&c11, o + FP + 8, 32);
      std::memcpy(&c12, o + FP + 16, 32);
      std::memcpy(&c20, o + 2 * FP, 32);
      std::memcpy(&c21, o + 2 * FP + 8, 32);
      std::memcpy(&c22, o + 2 * FP + 16, 32);
      std::memcpy(&c30, o + 3 * FP, 32);
      std::memcpy(&c31, o + 3 * FP + 8, 32);
      std::memcpy(&c32, o + 3 * FP + 16, 32);
      for (int b = 0; b < 16; ++b) {
        FloatLanes x0, x1, x2;
        const float* xr = x_t + b * FP + j;
        std::memcpy(&x0, xr, 32);
        std::memcpy(&x1, xr + 8, 32);
        std::memcpy(&x2, xr + 16, 32);
        const float w0 = d0[b], w1 = d0[16 + b], w2 = d0[32 + b], w3 = d0[48 + b];
        c00 += w0 * x0;
        c01 += w0 * x1;
        c02 += w0 * x2;
        c10 += w1 * x0;
        c11 += w1 * x1;
        c12 += w1 * x2;
        c20 += w2 * x0;
        c21 += w2 * x1;
        c22 += w2 * x2;
        c30 += w3 * x0;
        c31 += w3 * x1;
        c32 += w3 * x2;
      }
      std::memcpy(o, &c00, 32);
      std::memcpy(o + 8, &c01, 32);
      std::memcpy(o + 16, &c02, 32);
      std::memcpy(o + FP, &c10, 32);
      std::memcpy(o + FP + 8, &c11, 32);
      std::memcpy(o + FP + 16, &c12, 32);
      std::memcpy(o + 2 * FP, &c20, 32);
      std::memcpy(o + 2 * FP + 8, &c21, 32);
      std::memcpy(o + 2 * FP + 16, &c22, 32);
      std::memcpy(o + 3 * FP, &c30, 32);
      std::memcpy(o + 3 * FP + 8, &c31, 32);
      std::memcpy(o + 3 * FP + 16, &c32, 32);
    }
  }
  for (; j < FP; j += kFloatLanes) {
    for (int64_t r = 0; r < M; r += 4) {
      const float* d0 = dz + r * 16;
      float* o = acc + r * FP + j;
      // two accumulators per row (even / odd lanes): eight FMA chains
      FloatLanes c0, c1, c2, c3, e0 = FloatLanes{}, e1 = e0, e2 = e0, e3 = e0;
      std::memcpy(&c0, o, 32);
      std::memcpy(&c1, o + FP, 32);
      std::memcpy(&c2, o + 2 * FP, 32);
      std::memcpy(&c3, o + 3 * FP, 32);
      for (int b = 0; b < 16; b += 2) {
        FloatLanes x, y;
        std::memcpy(&x, x_t + b * FP + j, 32);
        std::memcpy(&y, x_t + (b + 1) * FP + j, 32);
        c0 += d0[b] * x;
        c1 += d0[16 + b] * x;
        c2 += d0[32 + b] * x;
        c3 += d0[48 + b] * x;
        e0 += d0[b + 1] * y;
        e1 += d0[17 + b] * y;
        e2 += d0[33 + b] * y;
        e3 += d0[49 + b] * y;
      }
      c0 += e0;
      c1 += e1;
      c2 += e2;
      c3 += e3;
      std::memcpy(o, &c0, 32);
      std::memcpy(o + FP, &c1, 32);
      std::memcpy(o + 2 * FP, &c2, 32);
      std::memcpy(o + 3 * FP, &c3, 32);
    }
  }
}

// float, 16 lanes: eight named vector accumulators. GCC keeps named vectors in registers; the
// array form above gets spilled to the stack inside the k loop (3x slower at H = 16).
template <>
S2META_INLINE void gemm_block_packed4<float, 16>(const float* __restrict__ A4, const float* __restrict__ bias,
                                                 const float* __restrict__ X, int64_t M, int64_t Kd,
                                                 float* __restrict__ out) {
  for (int64_t m = 0; m < M; m += 4) {
    FloatLanes a00 = FloatLanes{} + bias[m], a01 = a00;
    FloatLanes a10 = FloatLanes{} + bias[m + 1], a11 = a10;
    FloatLanes a20 = FloatLanes{} + bias[m + 2], a21 = a20;
    FloatLanes a30 = FloatLanes{} + bias[m + 3], a31 = a30;
    const float* a = A4 + m * Kd;
    for (int64_t k = 0; k < Kd; ++k) {
      FloatLanes x0, x1;
      std::memcpy(&x0, X + k * 16, sizeof(x0));
      std::memcpy(&x1, X + k * 16 + 8, sizeof(x1));
      const float w0 = a[4 * k], w1 = a[4 * k + 1], w2 = a[4 * k + 2], w3 = a[4 * k + 3];
      a00 += w0 * x0;
      a01 += w0 * x1;
      a10 += w1 * x0;
      a11 += w1 * x1;
      a20 += w2 * x0;
      a21 += w2 * x1;
      a30 += w3 * x0;
      a31 += w3 * x1;
    }
    float* o = out + m * 16;
    std::memcpy(o, &a00, 32);
    std::memcpy(o + 8, &a01, 32);
    std::memcpy(o + 16, &a10, 32);
    std::memcpy(o + 24, &a11, 32);
    std::memcpy(o + 32, &a20, 32);
    std::memcpy(o + 40, &a21, 32);
    std::memcpy(o + 48, &a30, 32);
    std::memcpy(o + 56, &a31, 32);
  }
}

// 16 x 16 transpose in 64-byte registers (AVX-512 builds only): four stages, each swapping the two
// off-diagonal d x d blocks of every 2d x 2d block (d = 8, 4, 2, 1) with one two-source shuffle per
// row. Each output row is one whole 64-byte line, written by a non-temporal store.
template <int d>
S2META_INLINE void swap_off_diagonal_blocks(FloatLanes16* r) {
#define S2META_LO(c) (((c) & d) == 0 ? (c) : 16 + (c) - d)
#define S2META_HI(c) (((c) & d) == 0 ? (c) + d : 16 + (c))
  constexpr IntLanes16 lo = {S2META_LO(0),  S2META_LO(1),  S2META_LO(2),  S2META_LO(3),  S2META_LO(4),  S2META_LO(5),
                             S2META_LO(6),  S2META_LO(7),  S2META_LO(8),  S2META_LO(9),  S2META_LO(10), S2META_LO(11),
                             S2META_LO(12), S2META_LO(13), S2META_LO(14), S2META_LO(15)};
  constexpr IntLanes16 hi = {S2META_HI(0),  S2META_HI(1),  S2META_HI(2),  S2META_HI(3),  S2META_HI(4),  S2META_HI(5),
                             S2META_HI(6),  S2META_HI(7),  S2META_HI(8),  S2META_HI(9),  S2META_HI(10), S2META_HI(11),
                             S2META_HI(12), S2META_HI(13), S2META_HI(14), S2META_HI(15)};
#undef S2META_LO
#undef S2META_HI
  for (int i = 0; i < 16; ++i) {
    if (i & d) continue;
    const FloatLanes16 a = r[i], b = r[i + d];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + d] = __builtin_shuffle(a, b, hi);
  }
}

// dst and dst_stride * 4 bytes must be multiples of 64; the caller fences (sfence) after its last store.
S2META_INLINE void transpose16x16_streaming(const float* __restrict__ src, int64_t src_stride,
                                            float* __restrict__ dst, int64_t dst_stride) {
  FloatLanes16 r[16];
  for (int i = 0; i < 16; ++i) std::memcpy(&r[i], src + i * src_stride, 64);
  swap_off_diagonal_blocks<8>(r);
  swap_off_diagonal_blocks<4>(r);
  swap_off_diagonal_blocks<2>(r);
  swap_off_diagonal_blocks<1>(r);
  for (int i = 0; i < 16; ++i) __builtin_ia32_movntps512(dst + i * dst_stride, r[i]);
}

// The AVX-512 forms of the two block products, for 64-byte lanes (call them only from code built
// for AVX-512). A block row of 16 floats is one register, so eight rows of accumulators are eight
// registers: eight independent FMA chains, what two FMA pipes of latency four need.

// gemm_block_packed4<float, 16> for M a multiple of 8: two packed groups of four rows at once.
S2META_INLINE void gemm_block_packed4_wide(const float* __restrict__ A4, const float* __restrict__ bias,
                                           const float* __restrict__ X, int64_t M, int64_t Kd,
                                           float* __restrict__ out) {
  using V = FloatVec<64>::F;
  for (int64_t m = 0; m < M; m += 8) {
    V a0 = V{} + bias[m], a1 = V{} + bias[m + 1], a2 = V{} + bias[m + 2], a3 = V{} + bias[m + 3];
    V a4 = V{} + bias[m + 4], a5 = V{} + bias[m + 5], a6 = V{} + bias[m + 6], a7 = V{} + bias[m + 7];
    const float* p = A4 + m * Kd;
    const float* q = p + 4 * Kd;
    for (int64_t k = 0; k < Kd; ++k) {
      V x;
      std::memcpy(&x, X + k * 16, sizeof(x));
      a0 += p[4 * k] * x;
      a1 += p[4 * k + 1] * x;
      a2 += p[4 * k + 2] * x;
      a3 += p[4 * k + 3] * x;
      a4 += q[4 * k] * x;
      a5 += q[4 * k + 1] * x;
      a6 += q[4 * k + 2] * x;
      a7 += q[4 * k + 3] * x;
    }
    float* o = out + m * 16;
    std::memcpy(o, &a0, 64);
    std::memcpy(o + 16, &a1, 64);
    std::memcpy(o + 32, &a2, 64);
    std::memcpy(o + 48, &a3, 64);
    std::memcpy(o + 64, &a4, 64);
    std::memcpy(o + 80, &a5, 64);
    std::memcpy(o + 96, &a6, 64);
    std::memcpy(o + 112, &a7, 64);
  }
}

// accumulate_outer<float, 16> for FP == 24 (H = 16: 5 features + 16 h + the bias column, padded)
// and M a multiple of 8: a row of the tile is one 16-wide and one 8-wide register, and eight rows
// give sixteen accumulators, each lane's x row loaded once for all eight.
S2META_INLINE void accumulate_outer_wide24(float* __restrict__ acc, const float* __restrict__ dz,
                                           const float* __restrict__ x_t, int64_t M) {
  using W = FloatVec<64>::F;
  using N = FloatLanes;
  constexpr int64_t FP = 24;
  for (int64_t r = 0; r < M; r += 8) {
    float* o = acc + r * FP;
    const float* d = dz + r * 16;
    W w0, w1, w2, w3, w4, w5, w6, w7;
    N n0, n1, n2, n3, n4, n5, n6, n7;
    std::memcpy(&w0, o, 64);
    std::memcpy(&n0, o + 16, 32);
    std::memcpy(&w1, o + FP, 64);
    std::memcpy(&n1, o + FP + 16, 32);
    std::memcpy(&w2, o + 2 * FP, 64);
    std::memcpy(&n2, o + 2 * FP + 16, 32);
    std::memcpy(&w3, o + 3 * FP, 64);
    std::memcpy(&n3, o + 3 * FP + 16, 32);
    std::memcpy(&w4, o + 4 * FP, 64);
    std::memcpy(&n4, o + 4 * FP + 16, 32);
    std::memcpy(&w5, o + 5 * FP, 64);
    std::memcpy(&n5, o + 5 * FP + 16, 32);
    std::memcpy(&w6, o + 6 * FP, 64);
    std::memcpy(&n6, o + 6 * FP + 16, 32);
    std::memcpy(&w7, o + 7 * FP, 64);
    std::memcpy(&n7, o + 7 * FP + 16, 32);
    for (int b = 0; b < 16; ++b) {
      W xw;
      N xn;
      std::memcpy(&xw, x_t + b * FP, 64);
      std::memcpy(&xn, x_t + b * FP + 16, 32);
      const float s0 = d[b], s1 = d[16 + b], s2 = d[32 + b], s3 = d[48 + b];
      const float s4 = d[64 + b], s5 = d[80 + b], s6 = d[96 + b], s7 = d[112 + b];
      w0 += s0 * xw;
      n0 += s0 * xn;
      w1 += s1 * xw;
      n1 += s1 * xn;
      w2 += s2 * xw;
      n2 += s2 * xn;
      w3 += s3 * xw;
      n3 += s3 * xn;
      w4 += s4 * xw;
      n4 += s4 * xn;
      w5 += s5 * xw;
      n5 += s5 * xn;
      w6 += s6 * xw;
      n6 += s6 * xn;
      w7 += s7 * xw;
      n7 += s7 * xn;
    }
    std::memcpy(o, &w0, 64);
    std::memcpy(o + 16, &n0, 32);
    std::memcpy(o + FP, &w1, 64);
    std::memcpy(o + FP + 16, &n1, 32);
    std::memcpy(o + 2 * FP, &w2, 64);
    std::memcpy(o + 2 * FP + 16, &n2, 32);
    std::memcpy(o + 3 * FP, &w3, 64);
    std::memcpy(o + 3 * FP + 16, &n3, 32);
    std::memcpy(o + 4 * FP, &w4, 64);
    std::memcpy(o + 4 * FP + 16, &n4, 32);
    std::memcpy(o + 5 * FP, &w5, 64);
    std::memcpy(o + 5 * FP + 16, &n5, 32);
    std::memcpy(o + 6 * FP, &w6, 64);
    std::memcpy(o + 6 * FP + 16, &n6, 32);
    std::memcpy(o + 7 * FP, &w7, 64);
    std::memcpy(o + 7 * FP + 16, &n7, 32);
  }
}
#endif

}  // namespace lstm_cpu
}  // namespace s2meta
