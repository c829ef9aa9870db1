// The activations of the CPU lstm_update kernel over a block of coordinates, and the GCC vector
// lanes they are written in. Plain loops over the lanes of a block, so that each ISA clone of the
// kernel (isa.h) runs them on its own vector width: 64-byte lanes in the AVX-512 clone, 32-byte
// lanes in the AVX2 one and in the baseline build (where GCC splits each into two SSE halves).
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

#include "ops/cpu/isa.h"
#include "ops/grad_preprocess.h"

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
  static S2META_ALWAYS_INLINE V bits_to_float(VI i) {
    V f;
    std::memcpy(&f, &i, sizeof(f));
    return f;
  }
  static S2META_ALWAYS_INLINE VI float_to_bits(V f) {
    VI i;
    std::memcpy(&i, &f, sizeof(i));
    return i;
  }
  static S2META_ALWAYS_INLINE V abs(V x) { return bits_to_float(float_to_bits(x) & 0x7fffffffu); }

  // e^x for x <= 0 (all the activations need); 0 below -87 where e^x leaves the normal range.
  static S2META_ALWAYS_INLINE V exp_nonpositive(V x) {
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
  static S2META_ALWAYS_INLINE V log_normal(V x) {
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

  static S2META_ALWAYS_INLINE V sigmoid(V z) {
    const V e = exp_nonpositive(-abs(z));
    const V r = 1.0f / (1.0f + e);
    return z >= 0.0f ? r : e * r;  // NaN: the compare is false and e * r is NaN
  }

  static S2META_ALWAYS_INLINE V tanh(V x) {
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

#if S2META_GCC_VECTORS
using FloatLanes = cpu::Vec<float, 32>::type;
using IntLanes = cpu::Vec<uint32_t, 32>::type;
constexpr int kFloatLanes = 8;

// Lanes of VB bytes: 32 in the AVX2 and baseline builds, 64 in the AVX-512 one (a block row of
// 16 floats is then one register, which halves the instruction count of every loop below).
using FloatLanes16 = cpu::Vec<float, 64>::type;
using IntLanes16 = cpu::Vec<uint32_t, 64>::type;
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
  static S2META_ALWAYS_INLINE float sigmoid(float z) { return Scalar::sigmoid(z); }
  static S2META_ALWAYS_INLINE float tanh(float x) { return Scalar::tanh(x); }

#if S2META_GCC_VECTORS
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
  static S2META_ALWAYS_INLINE void sigmoid_inplace(float* a, int64_t n) { S2META_APPLY_LANES(a, n, sigmoid) }
  template <int VB = 32>
  static S2META_ALWAYS_INLINE void tanh_inplace(float* a, int64_t n) { S2META_APPLY_LANES(a, n, tanh) }
#undef S2META_APPLY_LANES
  // dst = lstm::clamp_keep_nan(src, clip) (NaN stays NaN), as selects: no per-lane branches.
  // n is a multiple of the lane count.
  template <int VB = 32>
  static S2META_ALWAYS_INLINE void clamp_copy(const float* src, float clip, float* dst, int64_t n) {
#if S2META_GCC_VECTORS
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
  static S2META_ALWAYS_INLINE void preprocess(const float* x, int64_t n, float p, float threshold, float exp_p,
                                              float* log_part, float* sign_part) {
#if S2META_GCC_VECTORS
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
  static S2META_ALWAYS_INLINE double sigmoid(double z) {
    const double e = std::exp(-std::fabs(z));
    const double r = 1.0 / (1.0 + e);
    return z >= 0.0 ? r : e * r;
  }
  static S2META_ALWAYS_INLINE double tanh(double x) { return std::tanh(x); }
  // VB (the float lane width) is unused: fp64 is the checking path.
  template <int VB = 32>
  static S2META_ALWAYS_INLINE void sigmoid_inplace(double* a, int64_t n) {
    for (int64_t e = 0; e < n; ++e) a[e] = sigmoid(a[e]);
  }
  template <int VB = 32>
  static S2META_ALWAYS_INLINE void tanh_inplace(double* a, int64_t n) {
    for (int64_t e = 0; e < n; ++e) a[e] = std::tanh(a[e]);
  }
  template <int VB = 32>
  static S2META_ALWAYS_INLINE void clamp_copy(const double* src, double clip, double* dst, int64_t n) {
    for (int64_t e = 0; e < n; ++e) dst[e] = src[e] < -clip ? -clip : (src[e] > clip ? clip : src[e]);
  }
  template <int VB = 32>
  static S2META_ALWAYS_INLINE void preprocess(const double* x, int64_t n, double p, double threshold, double exp_p,
                                              double* log_part, double* sign_part) {
    for (int64_t e = 0; e < n; ++e) preprocess_scalar(x[e], p, threshold, exp_p, &log_part[e], &sign_part[e]);
  }
};

}  // namespace lstm_cpu
}  // namespace s2meta
