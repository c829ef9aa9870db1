// grad_preprocess on the GPU: Eq. 12 elementwise (formula in grad_preprocess.h), grid-stride.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "ops/grad_preprocess.h"

namespace s2meta {
namespace {

template <typename scalar_t>
__global__ void grad_preprocess_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n,
                                       scalar_t p, scalar_t threshold, scalar_t exp_p) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    preprocess_scalar(x[i], p, threshold, exp_p, &out[2 * i], &out[2 * i + 1]);
  }
}

at::Tensor grad_preprocess_cuda(const at::Tensor& x, double p) {
  check_floating(x, "grad_preprocess", "x");
  TORCH_CHECK(p > 0, "grad_preprocess: p must be positive, got ", p);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.push_back(2);
  at::Tensor out = at::empty(out_shape, x.options());
  const int64_t n = input.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grad_preprocess_cuda", [&] {
    grad_preprocess_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, static_cast<scalar_t>(p),
        static_cast<scalar_t>(std::exp(-p)), static_cast<scalar_t>(std::exp(p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(s2meta, CUDA, m) { m.impl("grad_preprocess", &grad_preprocess_cuda); }

}  // namespace s2meta
