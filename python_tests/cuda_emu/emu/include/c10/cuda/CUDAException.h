// cuda_emu: C10_CUDA_CHECK and the launch check over the emulated runtime.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                   \
  do {                                                                         \
    const cudaError_t s2meta_emu_err = (EXPR);                                 \
    TORCH_CHECK(s2meta_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(s2meta_emu_err)); \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
