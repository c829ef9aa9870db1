// Argument checks shared by every kernel file. Each check names the argument it rejects, so a
// user sees "lstm_update: h must have 16 columns (the hidden size), got 8" instead of a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace s2meta {

// A float32/float64 tensor (the kernels are instantiated for exactly those two).
inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; all tensors must share one dtype");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors must be on one device");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op,
                       const char* name, const char* meaning) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") must be ", expected, " (",
              meaning, "), got shape ", t.sizes());
}

// Floating, same dtype and device as `ref`.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  check_floating(t, op, name);
  check_same_dtype(t, ref, op, name, ref_name);
  check_same_device(t, ref, op, name, ref_name);
}

}  // namespace s2meta
