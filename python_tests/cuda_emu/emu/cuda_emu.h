// Host emulation of the CUDA device-code dialect the kernels use, force-included (-include)
// before every kernel file the harness compiles as host C++ (see emu_build.py).
//
// Model: a launch runs its blocks one after another; each CUDA thread of a block is a fiber
// with its own threadIdx. A fiber runs until it reaches __syncthreads() or returns; when every
// live fiber of the block waits at the same __syncthreads() the barrier opens. The order in
// which fibers run between barriers is a schedule (forward, reverse or seeded shuffle), so a
// missing barrier shows up as a read of data not yet written (or already overwritten) by
// another thread. Dynamic and static shared memory are exact-size heap buffers filled with NaN
// bytes before each block; AddressSanitizer sees every overrun.
//
// Anything the model cannot execute faithfully (warp shuffles and votes, atomics, fences) is
// refused at compile time: using it fails the build with a message naming the primitive.
#pragma once

#include <math.h>  // the float overloads of ::exp, ::tanh, ... in the global namespace, as on the device

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- declaration specifiers -------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Every __shared__ declaration is rewritten by emu_build.py; one that slipped through must not compile.
#define __shared__ S2META_EMU_ERROR_unrewritten___shared___declaration
#define __constant__ S2META_EMU_ERROR___constant___memory_is_not_modelled

// ---- built-in variables -----------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace s2meta_emu {
struct Builtins {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
};
Builtins& builtins();
}  // namespace s2meta_emu

#define threadIdx (::s2meta_emu::builtins().thread_idx)
#define blockIdx (::s2meta_emu::builtins().block_idx)
#define blockDim (::s2meta_emu::builtins().block_dim)
#define gridDim (::s2meta_emu::builtins().grid_dim)
constexpr int warpSize = 32;

// Vector types with the device's size and alignment: a misaligned vector access, which faults on
// the device, is a UBSan alignment error here.
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };

// ---- runtime types the launchers name ---------------------------------------------------
struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

namespace s2meta_emu {

// What a launch asks for, checked as the device checks it (limits of an sm_90 GPU by default).
struct DeviceLimits {
  size_t shared_default = 48 * 1024;    // dynamic + static without the opt-in attribute
  size_t shared_optin = 227 * 1024;     // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int multiprocessors = 132;
};
DeviceLimits& limits();

cudaError_t set_func_shared_optin(const void* kernel, int bytes);
cudaError_t check_launch(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes);
void run_grid(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* context);

void syncthreads(const char* file, int line);
void* dynamic_shared();
void* static_shared(const char* file, int line, size_t bytes);
bool mutant(const char* name);
cudaError_t get_last_error();
const char* error_string(cudaError_t e);
const int& knob(const char* name, int fallback);

template <typename Kernel, typename Params, size_t... I>
void call_with(Kernel kernel, const Params& params, std::index_sequence<I...>) {
  // Each thread gets its own copy of the by-value parameters, as each device thread may
  // modify its parameters without affecting the others.
  Params mine = params;
  kernel(std::get<I>(mine)...);
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t shared_bytes;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    if (check_launch(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes) != cudaSuccess) return;
    using Params = std::tuple<std::decay_t<P>...>;
    struct Context {
      void (*kernel)(P...);
      Params params;
    } context{kernel, Params(std::forward<A>(args)...)};
    run_grid(grid, block, shared_bytes,
             [](void* c) {
               auto* ctx = static_cast<Context*>(c);
               call_with(ctx->kernel, ctx->params, std::index_sequence_for<P...>{});
             },
             &context);
  }
};

// `kernel<<<grid, block, shared, stream>>>(args)` is rewritten to `launch(kernel, grid, block, shared, stream)(args)`.
template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, block, shared_bytes};
}

template <typename T>
struct Refused : std::false_type {};

}  // namespace s2meta_emu

#define __syncthreads() ::s2meta_emu::syncthreads(__FILE__, __LINE__)

// ---- primitives the model refuses -------------------------------------------------------
// Warp-synchronous code needs lock-step warps, atomics and fences need a memory model across
// concurrently running threads; the fiber model has neither, so it must not pretend to run them.
#define S2META_EMU_REFUSE(name, why)                                                               \
  template <typename... A>                                                                         \
  inline int name(A...) {                                                                          \
    static_assert(::s2meta_emu::Refused<void(A...)>::value,                                        \
                  "cuda_emu refuses " #name ": " why "; extend python_tests/cuda_emu/emu before using it"); \
    return 0;                                                                                      \
  }
#define S2META_EMU_WARP "warp-level primitives need lock-step warps, which the fiber model does not have"
S2META_EMU_REFUSE(__shfl_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__shfl_up_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__shfl_down_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__shfl_xor_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__shfl, S2META_EMU_WARP)
S2META_EMU_REFUSE(__shfl_up, S2META_EMU_WARP)
S2META_EMU_REFUSE(__shfl_down, S2META_EMU_WARP)
S2META_EMU_REFUSE(__shfl_xor, S2META_EMU_WARP)
S2META_EMU_REFUSE(__ballot_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__any_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__all_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__ballot, S2META_EMU_WARP)
S2META_EMU_REFUSE(__any, S2META_EMU_WARP)
S2META_EMU_REFUSE(__all, S2META_EMU_WARP)
S2META_EMU_REFUSE(__activemask, S2META_EMU_WARP)
S2META_EMU_REFUSE(__syncwarp, S2META_EMU_WARP)
S2META_EMU_REFUSE(__match_any_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__match_all_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__reduce_add_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__reduce_min_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__reduce_max_sync, S2META_EMU_WARP)
S2META_EMU_REFUSE(__syncthreads_count, "barrier reductions are not modelled")
S2META_EMU_REFUSE(__syncthreads_and, "barrier reductions are not modelled")
S2META_EMU_REFUSE(__syncthreads_or, "barrier reductions are not modelled")
S2META_EMU_REFUSE(__threadfence, "memory fences are not modelled")
S2META_EMU_REFUSE(__threadfence_block, "memory fences are not modelled")
S2META_EMU_REFUSE(atomicAdd, "atomics are not modelled")
S2META_EMU_REFUSE(atomicSub, "atomics are not modelled")
S2META_EMU_REFUSE(atomicExch, "atomics are not modelled")
S2META_EMU_REFUSE(atomicMin, "atomics are not modelled")
S2META_EMU_REFUSE(atomicMax, "atomics are not modelled")
S2META_EMU_REFUSE(atomicCAS, "atomics are not modelled")
S2META_EMU_REFUSE(__ldg, "read-only cache loads are not modelled")
