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
#endif

template <>
struct Act<float> {
  using Scalar = FloatActImpl<float, uint32_t>;
  static S2META_INLINE float sigmoid(float z) { return Scalar::sigmoid(z); }
  static S2META_INLINE float tanh(float x) { return Scalar::tanh(x); }

#ifdef S2META_VECTOR_ACTIVATIONS
  using Lanes = FloatActImpl<FloatLanes, IntLanes>;
#define S2META_APPLY_LANES(a, n, fn)                 \
  int64_t e = 0;                                     \
  for (; e + kFloatLanes <= n; e += kFloatLanes) {   \
    FloatLanes v;                                    \
    std::memcpy(&v, a + e, sizeof(v));               \
    v = Lanes::fn(v);                                \
    std::memcpy(a + e, &v, sizeof(v));               \
  }                                                  \
  for (; e < n; ++e) a[e] = Scalar::fn(a[e]);
#else
#define S2META_APPLY_LANES(a, n, fn) \
  for (int64_t e = 0; e < n; ++e) a[e] = Scalar::fn(a[e]);
#endif
  static S2META_INLINE void sigmoid_inplace(float* a, int64_t n) { S2META_APPLY_LANES(a, n, sigmoid) }
  static S2META_INLINE void tanh_inplace(float* a, int64_t n) { S2META_APPLY_LANES(a, n, tanh) }
#undef S2META_APPLY_LANES
};

template <>
struct Act<double> {
  static S2META_INLINE double sigmoid(double z) {
    const double e = std::exp(-std::fabs(z));
    const double r = 1.0 / (1.0 + e);
    return z >= 0.0 ? r : e * r;
  }
  static S2META_INLINE double tanh(double x) { return std::tanh(x); }
  static S2META_INLINE void sigmoid_inplace(double* a, int64_t n) {
    for (int64_t e = 0; e < n; ++e) a[e] = sigmoid(a[e]);
  }
  static S2META_INLINE void tanh_inplace(double* a, int64_t n) {
    for (int64_t e = 0; e < n; ++e) a[e] = std::tanh(a[e]);
  }
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
// float, FP a multiple of 8: a 4-row x 8-column tile stays in four vector registers across the
// B lanes, instead of a load-FMA-store of the accumulator per lane.
template <>
S2META_INLINE void accumulate_outer<float, 16>(float* __restrict__ acc, const float* __restrict__ dz,
                                               const float* __restrict__ x_t, int64_t M, int64_t FP) {
  if (M % 4 != 0 || FP % kFloatLanes != 0) {
    for (int b = 0; b < 16; ++b)
      for (int64_t r = 0; r < M; ++r)
        for (int64_t j = 0; j < FP; ++j) acc[r * FP + j] += dz[r * 16 + b] * x_t[b * FP + j];
    return;
  }
  for (int64_t r = 0; r < M; r += 4) {
    const float* d0 = dz + r * 16;
    for (int64_t j = 0; j < FP; j += kFloatLanes) {
      float* o = acc + r * FP + j;
      FloatLanes c0, c1, c2, c3;
      std::memcpy(&c0, o, 32);
      std::memcpy(&c1, o + FP, 32);
      std::memcpy(&c2, o + 2 * FP, 32);
      std::memcpy(&c3, o + 3 * FP, 32);
      for (int b = 0; b < 16; ++b) {
        FloatLanes x;
        std::memcpy(&x, x_t + b * FP + j, 32);
        c0 += d0[b] * x;
        c1 += d0[16 + b] * x;
        c2 += d0[32 + b] * x;
        c3 += d0[48 + b] * x;
      }
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
#endif

}  // namespace lstm_cpu
}  // namespace s2meta
