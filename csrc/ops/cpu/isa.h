// The instruction-set layer of every CPU kernel: which ISA the hot loops run in, the attributes
// that compile them once per ISA, and the GCC vector types they are written in.
//
// A kernel writes its hot loops once, as always-inline templates over a vector width, and
// instantiates them in three entry points: the baseline x86-64 build (SSE2), one marked
// S2META_TARGET_AVX2 (AVX2 + FMA) and one marked S2META_TARGET_AVX512 (AVX-512 F/VL/BW/DQ).
// isa() names the one to call: the widest the CPU supports, capped by the environment variable
// S2META_CPU_ISA = baseline | avx2 | avx512 (read once per process), so one wheel runs on any
// x86-64 and the tests can run every clone on one machine. Without GCC-compatible x86-64
// compilation only the baseline exists.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__GNUC__)
#define S2META_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define S2META_ALWAYS_INLINE inline
#endif

// GCC's vector extensions beyond vector_size: lane-wise `?:` selects, __builtin_shuffle and
// __builtin_convertvector, which the controller kernel's activations and transposes are built on.
#if defined(__GNUC__) && !defined(__clang__)
#define S2META_GCC_VECTORS 1
// Wide vectors are passed by value only between always-inline helpers compiled into the clones,
// so the ABI note GCC attaches to them never applies.
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define S2META_GCC_VECTORS 0
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define S2META_ISA_CLONES 1
#define S2META_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define S2META_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define S2META_ISA_CLONES 0
#define S2META_TARGET_AVX2
#define S2META_TARGET_AVX512
#endif

namespace s2meta {
namespace cpu {

// Ordered: a cap keeps every level at or below it.
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

// The widest clone this CPU can run.
inline Isa supported_isa() {
#if S2META_ISA_CLONES
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return Isa::kBaseline;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  return Isa::kAvx2;
#else
  return Isa::kBaseline;
#endif
}

// The clone every CPU kernel runs: supported_isa() capped by S2META_CPU_ISA. An unknown value is
// an error naming the variable (raised by the first op call), not a silent fallback.
inline Isa isa() {
  static const Isa chosen = [] {
    const Isa supported = supported_isa();
    const char* env = std::getenv("S2META_CPU_ISA");
    if (env == nullptr || *env == '\0') return supported;
    const std::string wanted(env);
    Isa cap = Isa::kBaseline;
    if (wanted == "avx512") {
      cap = Isa::kAvx512;
    } else if (wanted == "avx2") {
      cap = Isa::kAvx2;
    } else {
      TORCH_CHECK(wanted == "baseline", "S2META_CPU_ISA must be one of baseline, avx2, avx512 (or unset), got '",
                  wanted, "'");
    }
    return std::min(cap, supported);
  }();
  return chosen;
}

// The width, in bytes, of one hardware vector in a clone: 64 (zmm), 32 (ymm) or 16 (xmm).
inline int vector_bytes(Isa isa) { return isa == Isa::kAvx512 ? 64 : (isa == Isa::kAvx2 ? 32 : 16); }

// kBytes of T as a GCC vector type; the explicit type makes the vectorisation certain. Spelled out
// per width: GCC drops vector_size from a typedef that depends on a template parameter. The
// scoring kernels use the clone's hardware width (vector_bytes); the controller kernel keeps its
// 32-byte lanes in the baseline build as well, where GCC splits each into two xmm halves.
template <typename T, int kBytes>
struct Vec;
template <>
struct Vec<float, 16> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct Vec<float, 32> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<float, 64> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double, 16> {
  typedef double type __attribute__((vector_size(16)));
};
template <>
struct Vec<double, 32> {
  typedef double type __attribute__((vector_size(32)));
};
template <>
struct Vec<double, 64> {
  typedef double type __attribute__((vector_size(64)));
};
template <>
struct Vec<uint32_t, 32> {
  typedef uint32_t type __attribute__((vector_size(32)));
};
template <>
struct Vec<uint32_t, 64> {
  typedef uint32_t type __attribute__((vector_size(64)));
};

template <typename V>
S2META_ALWAYS_INLINE V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

}  // namespace cpu
}  // namespace s2meta
