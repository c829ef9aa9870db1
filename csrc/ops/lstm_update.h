// The coordinatewise-LSTM update (docs/spec.md §3), pieces shared by the CPU and CUDA kernels:
// argument checks and input/output preparation (host) and the scalar activations (host + device).
//
// Per coordinate, with controller k = the segment holding it:
//   g  = clamp(grad, -clip, clip);  x = [pre(g), pre(theta), pre(loss)_0]    (Eq. 12, stop-grad)
//   z  = W_ih x + b_ih + W_hh h + b_hh                       (4H, LSTMCell order i, f, g, o)
//   c' = s(z_f) c + s(z_i) tanh(z_g);  u = s(z_o) tanh(c');  h' = LayerNorm(u) (or u)
//   alpha = s(w_gate[0] h' + b_gate[0]);  beta = s(w_gate[1] h' + b_gate[1])
//   theta' = beta theta - alpha g
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "common.h"
#include "host_device.h"
#include "ops/grad_preprocess.h"

namespace s2meta {
namespace lstm {

constexpr int64_t kFeatures = 5;
constexpr double kLayerNormEps = 1e-5;
// The CUDA kernels take the segment offsets by value (a graph-capturable launch needs no
// device-side copy of them), so the number of controllers per call is capped.
constexpr int kMaxControllersCuda = 64;

// Clamp that lets NaN through, as torch.clamp does (both comparisons are false for NaN).
template <typename T>
S2META_HOST_DEVICE T clamp_keep_nan(T x, T clip) {
  return x < -clip ? -clip : (x > clip ? clip : x);
}

// Sizes of one validated call.
struct Dims {
  int64_t S = 0;  // scenarios
  int64_t N = 0;  // coordinates per scenario
  int64_t H = 0;  // hidden size
  int64_t K = 0;  // controllers (segments)
  bool layer_norm = false;
};

inline void check_weight_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name,
                               const char* meaning) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, " (", meaning, "), got ",
              t.sizes());
}

// Validates every argument of lstm_update_multi (and the forward arguments of its backward);
// each message names the argument it rejects.
inline Dims check_multi_args(const char* op, const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& loss,
                             const at::Tensor& h, const at::Tensor& c, at::IntArrayRef offsets,
                             const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                             const at::Tensor& b_hh, const std::optional<at::Tensor>& ln_weight,
                             const std::optional<at::Tensor>& ln_bias, const at::Tensor& w_gate,
                             const at::Tensor& b_gate, double p, double clip) {
  check_floating(theta, op, "theta");
  check_dim(theta, 2, op, "theta");
  const struct {
    const at::Tensor* t;
    const char* name;
  } others[] = {{&grad, "grad"}, {&loss, "loss"}, {&h, "h"}, {&c, "c"}, {&w_ih, "w_ih"}, {&w_hh, "w_hh"},
                {&b_ih, "b_ih"}, {&b_hh, "b_hh"}, {&w_gate, "w_gate"}, {&b_gate, "b_gate"}};
  for (const auto& other : others) check_like(*other.t, theta, op, other.name, "theta");
  const bool has_w = ln_weight.has_value() && ln_weight->defined();
  const bool has_b = ln_bias.has_value() && ln_bias->defined();
  TORCH_CHECK(has_w == has_b, op, ": ln_weight and ln_bias must both be tensors or both be None, got ln_weight ",
              has_w ? "set" : "None", " and ln_bias ", has_b ? "set" : "None");
  if (has_w) {
    check_like(*ln_weight, theta, op, "ln_weight", "theta");
    check_like(*ln_bias, theta, op, "ln_bias", "theta");
  }
  TORCH_CHECK(p > 0, op, ": p must be positive, got ", p);
  TORCH_CHECK(clip >= 0, op, ": clip must be non-negative, got ", clip);

  Dims d;
  d.S = theta.size(0);
  d.N = theta.size(1);
  d.layer_norm = has_w;
  TORCH_CHECK(grad.sizes() == theta.sizes(), op, ": grad must have theta's shape ", theta.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(loss.dim() == 1 && loss.size(0) == d.S, op, ": loss must have shape [", d.S,
              "] (one loss per scenario), got ", loss.sizes());
  check_dim(h, 3, op, "h");
  TORCH_CHECK(h.size(0) == d.S && h.size(1) == d.N, op, ": h must have shape [S, N, H] = [", d.S, ", ", d.N,
              ", H] (one row per coordinate of theta), got ", h.sizes());
  d.H = h.size(2);
  TORCH_CHECK(d.H > 0, op, ": h must have at least one column (the hidden size), got ", h.sizes());
  TORCH_CHECK(c.sizes() == h.sizes(), op, ": c must have h's shape ", h.sizes(), ", got ", c.sizes());

  TORCH_CHECK(!offsets.empty(), op, ": offsets must hold K+1 >= 1 entries, got an empty list");
  TORCH_CHECK(offsets[0] == 0, op, ": offsets must start at 0, got ", offsets);
  for (size_t k = 1; k < offsets.size(); ++k) {
    TORCH_CHECK(offsets[k] >= offsets[k - 1], op, ": offsets must be non-decreasing, got ", offsets);
  }
  TORCH_CHECK(offsets.back() == d.N, op, ": offsets must end at N = theta.size(1) = ", d.N, ", got ", offsets);
  d.K = static_cast<int64_t>(offsets.size()) - 1;

  const int64_t H = d.H, K = d.K, G = 4 * H;
  check_weight_shape(w_ih, {K, G, kFeatures}, op, "w_ih", "[K, 4H, 5]");
  check_weight_shape(w_hh, {K, G, H}, op, "w_hh", "[K, 4H, H]");
  check_weight_shape(b_ih, {K, G}, op, "b_ih", "[K, 4H]");
  check_weight_shape(b_hh, {K, G}, op, "b_hh", "[K, 4H]");
  if (has_w) {
    check_weight_shape(*ln_weight, {K, H}, op, "ln_weight", "[K, H]");
    check_weight_shape(*ln_bias, {K, H}, op, "ln_bias", "[K, H]");
  }
  check_weight_shape(w_gate, {K, 2, H}, op, "w_gate", "[K, 2, H]");
  check_weight_shape(b_gate, {K, 2}, op, "b_gate", "[K, 2]");
  return d;
}

// The backward's incoming gradients must match the forward outputs they belong to.
inline void check_output_grads(const char* op, const Dims& d, const at::Tensor& theta, const at::Tensor& d_theta_new,
                               const at::Tensor& d_h_new, const at::Tensor& d_c_new, const at::Tensor& d_alpha,
                               const at::Tensor& d_beta) {
  const struct {
    const at::Tensor* t;
    const char* name;
    bool state;
  } grads[] = {{&d_theta_new, "d_theta_new", false}, {&d_h_new, "d_h_new", true}, {&d_c_new, "d_c_new", true},
               {&d_alpha, "d_alpha", false}, {&d_beta, "d_beta", false}};
  for (const auto& g : grads) {
    check_like(*g.t, theta, op, g.name, "theta");
    if (g.state) {
      TORCH_CHECK(g.t->dim() == 3 && g.t->size(0) == d.S && g.t->size(1) == d.N && g.t->size(2) == d.H, op, ": ",
                  g.name, " must have shape [", d.S, ", ", d.N, ", ", d.H, "], got ", g.t->sizes());
    } else {
      TORCH_CHECK(g.t->sizes() == theta.sizes(), op, ": ", g.name, " must have theta's shape ", theta.sizes(),
                  ", got ", g.t->sizes());
    }
  }
}

// The op's tensor inputs, each made contiguous once: both backends read them by raw pointer.
// ln_w/ln_b are undefined when the call has no LayerNorm.
struct Inputs {
  at::Tensor theta, grad, loss, h, c, w_ih, w_hh, b_ih, b_hh, ln_w, ln_b, w_gate, b_gate;
};

inline at::Tensor optional_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

inline Inputs contiguous_inputs(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& loss,
                                const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh,
                                const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                                const at::Tensor& w_gate, const at::Tensor& b_gate) {
  return {theta.contiguous(), grad.contiguous(), loss.contiguous(), h.contiguous(), c.contiguous(),
          w_ih.contiguous(), w_hh.contiguous(), b_ih.contiguous(), b_hh.contiguous(),
          optional_or_empty(ln_weight), optional_or_empty(ln_bias), w_gate.contiguous(), b_gate.contiguous()};
}

// The forward's results, allocated like the inputs they replace.
struct Outputs {
  at::Tensor theta_new, h_new, c_new, alpha, beta;

  explicit Outputs(const Inputs& in)
      : theta_new(at::empty_like(in.theta)), h_new(at::empty_like(in.h)), c_new(at::empty_like(in.c)),
        alpha(at::empty_like(in.theta)), beta(at::empty_like(in.theta)) {}
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {theta_new, h_new, c_new, alpha, beta};
  }
};

// The backward's incoming gradients, made contiguous.
struct OutputGrads {
  at::Tensor d_theta_new, d_h_new, d_c_new, d_alpha, d_beta;
};

inline OutputGrads contiguous_output_grads(const at::Tensor& d_theta_new, const at::Tensor& d_h_new,
                                           const at::Tensor& d_c_new, const at::Tensor& d_alpha,
                                           const at::Tensor& d_beta) {
  return {d_theta_new.contiguous(), d_h_new.contiguous(), d_c_new.contiguous(), d_alpha.contiguous(),
          d_beta.contiguous()};
}

using GradientTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The backward's results. Weight gradients start at zero: a controller whose segment is empty
// has no coordinate to write its sums. Without LayerNorm its gradients are empty [0] tensors.
struct InputGrads {
  at::Tensor d_theta, d_h, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_ln_w, d_ln_b, d_w_gate, d_b_gate;

  InputGrads(const Dims& d, const Inputs& in)
      : d_theta(at::empty_like(in.theta)), d_h(at::empty_like(in.h)), d_c(at::empty_like(in.c)),
        d_w_ih(at::zeros_like(in.w_ih)), d_w_hh(at::zeros_like(in.w_hh)), d_b_ih(at::zeros_like(in.b_ih)),
        d_b_hh(at::zeros_like(in.b_hh)),
        d_ln_w(d.layer_norm ? at::zeros_like(in.ln_w) : at::empty({0}, in.theta.options())),
        d_ln_b(d.layer_norm ? at::zeros_like(in.ln_b) : at::empty({0}, in.theta.options())),
        d_w_gate(at::zeros_like(in.w_gate)), d_b_gate(at::zeros_like(in.b_gate)) {}
  GradientTuple as_tuple() const {
    return {d_theta, d_h, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_ln_w, d_ln_b, d_w_gate, d_b_gate};
  }
};

}  // namespace lstm
}  // namespace s2meta
