// The block products of the CPU lstm_update kernel: the gate GEMM (and dh = W_hh^T dz) over a
// block of coordinates, and the weight-gradient outer products of a block. A portable template
// for any T and block width, float forms in GCC vector registers, and the AVX-512 forms for
// 64-byte lanes that only the AVX-512 clone calls.
#pragma once

#include <cstdint>
#include <cstring>

#include "ops/cpu/isa.h"
#include "ops/cpu/lstm_vector_math.h"

namespace s2meta {
namespace lstm_cpu {


// out[m][b] = bias[m] (or 0) + sum_k A[m][k] X[k][b] for a block of B columns. Four rows at a
// time keep 4 * B accumulators in registers and load each X row once per four rows.
template <typename T, int B>
S2META_ALWAYS_INLINE void gemm_block(const T* __restrict__ A, const T* __restrict__ bias, const T* __restrict__ X,
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
S2META_ALWAYS_INLINE void gemm_block_packed4(const T* __restrict__ A4, const T* __restrict__ bias,
                                             const T* __restrict__ X, int64_t M, int64_t Kd, T* __restrict__ out) {
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
S2META_ALWAYS_INLINE void accumulate_outer(T* __restrict__ acc, const T* __restrict__ dz, const T* __restrict__ x_t,
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

#if S2META_GCC_VECTORS
// float, FP a multiple of 8: a 4-row x 24-column tile (twelve vector accumulators) stays in
// registers across the B lanes. Twelve independent FMA chains hide the FMA latency (four, as
// before, left it latency-bound), and each lane costs 3 loads + 4 broadcasts per 12 FMAs.
template <>
S2META_ALWAYS_INLINE void accumulate_outer<float, 16>(float* __restrict__ acc, const float* __restrict__ dz,
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
S2META_ALWAYS_INLINE void gemm_block_packed4<float, 16>(const float* __restrict__ A4, const float* __restrict__ bias,
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

#if S2META_GCC_VECTORS && S2META_ISA_CLONES
// The AVX-512 forms of the two block products, for 64-byte lanes (call them only from code built
// for AVX-512). A block row of 16 floats is one register, so eight rows of accumulators are eight
// registers: eight independent FMA chains, what two FMA pipes of latency four need.

// gemm_block_packed4<float, 16> for M a multiple of 8: two packed groups of four rows at once.
S2META_ALWAYS_INLINE void gemm_block_packed4_wide(const float* __restrict__ A4, const float* __restrict__ bias,
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
S2META_ALWAYS_INLINE void accumulate_outer_wide24(float* __restrict__ acc, const float* __restrict__ dz,
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
