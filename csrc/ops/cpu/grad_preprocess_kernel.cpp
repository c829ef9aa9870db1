// grad_preprocess on the CPU: out[..., 0], out[..., 1] = Eq. 12 of x (see grad_preprocess.h),
// and its backward d/dx = (1 / (p x), 0) on the log branch, (0, e^p) on the linear branch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "ops/grad_preprocess.h"

namespace s2meta {
namespace {

at::Tensor grad_preprocess_cpu(const at::Tensor& x, double p) {
  check_floating(x, "grad_preprocess", "x");
  TORCH_CHECK(p > 0, "grad_preprocess: p must be positive, got ", p);
  const at::Tensor input = x.contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.push_back(2);
  at::Tensor out = at::empty(out_shape, x.options());
  const int64_t n = input.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grad_preprocess_cpu", [&] {
    const scalar_t* in_ptr = input.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    const scalar_t p_s = static_cast<scalar_t>(p);
    const scalar_t threshold = static_cast<scalar_t>(std::exp(-p));
    const scalar_t exp_p = static_cast<scalar_t>(std::exp(p));
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        preprocess_scalar(in_ptr[i], p_s, threshold, exp_p, &out_ptr[2 * i], &out_ptr[2 * i + 1]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(s2meta, CPU, m) { m.impl("grad_preprocess", &grad_preprocess_cpu); }

}  // namespace s2meta
