// lstm_update (one parameter tensor) as a composite of lstm_update_multi with S = 1, K = 1:
// theta is flattened to [1, N], the weights gain a leading controller dim of 1. Autograd,
// fake tensors and every backend therefore come from the multi op; this file only reshapes.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "ops/lstm_update.h"

namespace s2meta {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs lstm_update_composite(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& loss,
                              const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh,
                              const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                              const at::Tensor& w_gate, const at::Tensor& b_gate, double p, double clip) {
  const char* op = "lstm_update";
  check_floating(theta, op, "theta");
  TORCH_CHECK(grad.sizes() == theta.sizes(), op, ": grad must have theta's shape ", theta.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(loss.dim() == 0, op, ": loss must be a 0-dim tensor, got shape ", loss.sizes());
  const int64_t n = theta.numel();
  check_dim(h, 2, op, "h");
  TORCH_CHECK(h.size(0) == n, op, ": h must have one row per element of theta (", n, "), got shape ", h.sizes());
  check_dim(c, 2, op, "c");
  TORCH_CHECK(c.sizes() == h.sizes(), op, ": c must have h's shape ", h.sizes(), ", got ", c.sizes());
  const int64_t H = h.size(1);
  check_dim(w_ih, 2, op, "w_ih");
  TORCH_CHECK(w_ih.size(0) == 4 * H && w_ih.size(1) == lstm::kFeatures, op, ": w_ih must have shape [4H, 5] = [",
              4 * H, ", 5], got ", w_ih.sizes());
  check_dim(w_hh, 2, op, "w_hh");
  check_dim(b_ih, 1, op, "b_ih");
  check_dim(b_hh, 1, op, "b_hh");
  check_dim(w_gate, 2, op, "w_gate");
  check_dim(b_gate, 1, op, "b_gate");
  auto lift = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value() || !t->defined()) return std::nullopt;
    return t->unsqueeze(0);
  };

  static const auto multi = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("s2meta::lstm_update_multi", "")
                                .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, const at::Tensor&,
                                               const at::Tensor&, double, double)>();
  const std::vector<int64_t> offsets = {0, n};
  auto [theta_new, h_new, c_new, alpha, beta] =
      multi.call(theta.reshape({1, n}), grad.reshape({1, n}), loss.reshape({1}), h.unsqueeze(0), c.unsqueeze(0),
                 offsets, w_ih.unsqueeze(0), w_hh.unsqueeze(0), b_ih.unsqueeze(0), b_hh.unsqueeze(0), lift(ln_weight),
                 lift(ln_bias), w_gate.unsqueeze(0), b_gate.unsqueeze(0), p, clip);
  return {theta_new.view(theta.sizes()), h_new.squeeze(0), c_new.squeeze(0), alpha.view(theta.sizes()),
          beta.view(theta.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2meta, CompositeImplicitAutograd, m) { m.impl("lstm_update", &lstm_update_composite); }

}  // namespace s2meta
