// Marks a function callable from host code and from CUDA device code: the scalar formulas the
// CPU and CUDA kernels share (ops/grad_preprocess.h, ops/hinge_score.h, ops/lstm_update.h) are
// written once with it, so both backends compute bit-for-bit the same expression.
#pragma once

#if defined(__CUDACC__)
#define S2META_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define S2META_HOST_DEVICE inline
#endif
