// Transposes of the CPU lstm_update kernel: a block's [kBlock][H] rows of a state tensor to its
// feature-major [H][kBlock] layout and back, in GCC vector registers where the shapes allow.
#pragma once

#include <cstdint>
#include <cstring>

#include "ops/cpu/isa.h"
#include "ops/cpu/lstm_vector_math.h"

namespace s2meta {
namespace lstm_cpu {

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < R, c < C: the row-major <->
// feature-major conversions of a block. float with R and C multiples of 8 goes through 8 x 8
// register transposes (unpack / shuffle / 128-bit lane swaps), everything else element by element.
template <typename T>
S2META_ALWAYS_INLINE void transpose_block(const T* __restrict__ src, int64_t src_stride, T* __restrict__ dst,
                                          int64_t dst_stride, int64_t R, int64_t C) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
}

#if S2META_GCC_VECTORS
S2META_ALWAYS_INLINE void transpose8x8(const float* __restrict__ src, int64_t src_stride, float* __restrict__ dst,
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
S2META_ALWAYS_INLINE void transpose_block<float>(const float* __restrict__ src, int64_t src_stride,
                                                 float* __restrict__ dst, int64_t dst_stride, int64_t R, int64_t C) {
  if (R % 8 != 0 || C % 8 != 0) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
    return;
  }
  for (int64_t r = 0; r < R; r += 8)
    for (int64_t c = 0; c < C; c += 8) transpose8x8(src + r * src_stride + c, src_stride, dst + c * dst_stride + r, dst_stride);
}
#endif

#if S2META_GCC_VECTORS && S2META_ISA_CLONES
// 16 x 16 transpose in 64-byte registers (AVX-512 builds only): four stages, each swapping the two
// off-diagonal d x d blocks of every 2d x 2d block (d = 8, 4, 2, 1) with one two-source shuffle per
// row. Each output row is one whole 64-byte line, written by a non-temporal store.
template <int d>
S2META_ALWAYS_INLINE void swap_off_diagonal_blocks(FloatLanes16* r) {
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
S2META_ALWAYS_INLINE void transpose16x16_streaming(const float* __restrict__ src, int64_t src_stride,
                                                   float* __restrict__ dst, int64_t dst_stride) {
  FloatLanes16 r[16];
  for (int i = 0; i < 16; ++i) std::memcpy(&r[i], src + i * src_stride, 64);
  swap_off_diagonal_blocks<8>(r);
  swap_off_diagonal_blocks<4>(r);
  swap_off_diagonal_blocks<2>(r);
  swap_off_diagonal_blocks<1>(r);
  for (int i = 0; i < 16; ++i) __builtin_ia32_movntps512(dst + i * dst_stride, r[i]);
}
#endif

}  // namespace lstm_cpu
}  // namespace s2meta
