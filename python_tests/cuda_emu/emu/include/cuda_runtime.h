// cuda_emu: the CUDA runtime calls the launchers make, answered by the emulated device.
#pragma once

#include "cuda_emu.h"

inline cudaError_t cudaGetLastError() { return ::s2meta_emu::get_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return ::s2meta_emu::error_string(e); }

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(::s2meta_emu::limits().shared_default); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(::s2meta_emu::limits().shared_optin); return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = ::s2meta_emu::limits().multiprocessors; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::s2meta_emu::set_func_shared_optin(reinterpret_cast<const void*>(kernel), value);
}
