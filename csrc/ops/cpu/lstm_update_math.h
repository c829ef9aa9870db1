// Activations and the small block GEMM of the CPU lstm_update kernel, written as plain loops
// over a block of B coordinates so that GCC vectorises them (AVX2 in the target("avx2,fma")
// instantiation, SSE2 otherwise).
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

#if defined(__GNUC__)
#define S2META_INLINE inline __attribute__((always_inline))
#else
#define S2META_INLINE inline
#endif

namespace s2meta {
namespace lstm_cpu {

template <typename T>
struct Act;

template <>
struct Act<float> {
  // e^x for x <= 0 (all the activations need); 0 below -87 where e^x leaves the normal range.
  static S2META_INLINE float exp_nonpositive(float x) {
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float t = x * 1.44269504088896341f + magic;
    const float n = t - magic;
    int32_t t_bits;
    std::memcpy(&t_bits, &t, sizeof(t_bits));
    int32_t magic_bits;
    std::memcpy(&magic_bits, &magic, sizeof(magic_bits));
    const int32_t ni = t_bits - magic_bits;
    // ln 2 split in two so that n * hi is exact for |n| < 2^15.
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float poly = 1.0f / 5040.0f;
    poly = poly * r + 1.0f / 720.0f;
    poly = poly * r + 1.0f / 120.0f;
    poly = poly * r + 1.0f / 24.0f;
    poly = poly * r + 1.0f / 6.0f;
    poly = poly * r + 0.5f;
    poly = poly * r + 1.0f;
    poly = poly * r + 1.0f;
    const int32_t scale_bits = (ni + 127) << 23;
    float scale;
    std::memcpy(&scale, &scale_bits, sizeof(scale));
    const float result = poly * scale;
    return x < -87.0f ? 0.0f : result;
  }

  static S2META_INLINE float sigmoid(float z) {
    const float e = exp_nonpositive(-std::fabs(z));
    const float r = 1.0f / (1.0f + e);
    return z >= 0.0f ? r : e * r;
  }

  static S2META_INLINE float tanh(float x) {
    const float a = std::fabs(x);
    const float e = exp_nonpositive(-2.0f * a);
    const float large = (1.0f - e) / (1.0f + e);
    // Taylor to x^11: relative truncation error < 3e-9 for |x| < 0.3125.
    const float x2 = x * x;
    float poly = -1382.0f / 155925.0f;
    poly = poly * x2 + 62.0f / 2835.0f;
    poly = poly * x2 - 17.0f / 315.0f;
    poly = poly * x2 + 2.0f / 15.0f;
    poly = poly * x2 - 1.0f / 3.0f;
    const float small = x + x * x2 * poly;
    const float signed_large = x < 0.0f ? -large : large;
    return a < 0.3125f ? small : signed_large;
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
};

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

}  // namespace lstm_cpu
}  // namespace s2meta
