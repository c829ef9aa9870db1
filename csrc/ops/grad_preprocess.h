// Paper Eq. 12, shared by the CPU and CUDA kernels so both compute bit-for-bit the same formula:
//   x -> (log|x| / p, sign x)   if |x| >= e^-p
//        (-1, e^p * x)           otherwise (NaN lands here, as in the reference)
#pragma once

#include <cmath>

#include "host_device.h"

namespace s2meta {

template <typename scalar_t>
S2META_HOST_DEVICE void preprocess_scalar(scalar_t x, scalar_t p, scalar_t threshold, scalar_t exp_p,
                                          scalar_t* log_part, scalar_t* sign_part) {
  const scalar_t magnitude = x < scalar_t(0) ? -x : x;
  if (magnitude >= threshold) {
#if defined(__CUDA_ARCH__)
    *log_part = ::log(magnitude) / p;
#else
    *log_part = std::log(magnitude) / p;
#endif
    *sign_part = x > scalar_t(0) ? scalar_t(1) : (x < scalar_t(0) ? scalar_t(-1) : scalar_t(0));
  } else {
    *log_part = scalar_t(-1);
    *sign_part = exp_p * x;
  }
}

}  // namespace s2meta
