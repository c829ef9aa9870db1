// Argument checks and the parameter layout shared by the scoring ops (hinge_score, score_matrix)
// on both backends.
//
// Kernels see the MLP of S scenarios as per-layer base pointers plus a scenario stride, with
// each [out, in] matrix (and [out] bias) contiguous inside. That is exactly the shape of the
// per-tensor views of a flat theta [S, N] (design.md), so the inner-loop parameters are used in
// place; anything else is copied once by prepare_mlp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "common.h"

namespace s2meta {

// Bounds the by-value parameter block a CUDA kernel receives; the interaction MLP has 4 layers.
constexpr int kMaxLayers = 16;

template <typename T>
struct MlpView {
  int num_layers;
  int64_t in[kMaxLayers];
  int64_t out[kMaxLayers];
  const T* w[kMaxLayers];  // layer l of scenario s: w[l] + s * w_stride[l], row-major [out, in]
  const T* b[kMaxLayers];  // b[l] + s * b_stride[l], [out]
  int64_t w_stride[kMaxLayers];
  int64_t b_stride[kMaxLayers];
};

// Validated inputs. Weights are [S, out, in] and biases [S, out] (an unbatched call gets S = 1).
struct MlpArgs {
  bool batched = false;
  int64_t scenarios = 1;
  int64_t dim = 0;  // embedding width d; the first layer takes [e_u; e_i] of width 2d
  std::vector<at::Tensor> weights;
  std::vector<at::Tensor> biases;
  int64_t max_width = 0;
  int64_t num_params = 0;  // per scenario, weights and biases of all layers

  int num_layers() const { return static_cast<int>(weights.size()); }
  int64_t in(int l) const { return weights[l].size(2); }
  int64_t out(int l) const { return weights[l].size(1); }

  template <typename T>
  MlpView<T> view() const {
    TORCH_INTERNAL_ASSERT(num_layers() <= kMaxLayers, "prepare_mlp admits at most kMaxLayers layers");
    MlpView<T> v{};
    v.num_layers = num_layers();
    for (int l = 0; l < v.num_layers; ++l) {
      v.in[l] = in(l);
      v.out[l] = out(l);
      v.w[l] = weights[l].const_data_ptr<T>();
      v.b[l] = biases[l].const_data_ptr<T>();
      v.w_stride[l] = weights[l].stride(0);
      v.b_stride[l] = biases[l].stride(0);
    }
    return v;
  }
};

inline std::string indexed(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// Embeddings as [S, n, d] whose rows are contiguous (row and scenario strides are free).
inline at::Tensor prepare_embedding(const at::Tensor& e) {
  at::Tensor t = e.dim() == 2 ? e.unsqueeze(0) : e;
  return t.stride(2) == 1 ? t : t.contiguous();
}

// Checks one embedding tensor against the first one (`ref`): dtype, device, rank, width.
inline void check_embedding(const at::Tensor& e, const char* op, const char* name, const at::Tensor& ref,
                            const char* ref_name) {
  check_like(e, ref, op, name, ref_name);
  TORCH_CHECK(e.dim() == 2 || e.dim() == 3, op, ": ", name, " must be [n, d] or [S, n, d], got shape ",
              e.sizes());
  TORCH_CHECK(e.dim() == ref.dim(), op, ": ", name, " has shape ", e.sizes(), " but ", ref_name, " has shape ",
              ref.sizes(), "; both need the same rank (a leading scenario dim on all or none)");
  TORCH_CHECK(e.size(-1) == ref.size(-1), op, ": ", name, " has width ", e.size(-1), " but ", ref_name,
              " has width ", ref.size(-1), "; user and item embeddings must share the width d");
  if (e.dim() == 3) {
    TORCH_CHECK(e.size(0) == ref.size(0), op, ": ", name, " has S = ", e.size(0), " scenarios but ", ref_name,
                " has S = ", ref.size(0));
  }
}

// Validates weights/biases for embeddings shaped like `ref` ([n, d] or [S, n, d]).
inline MlpArgs prepare_mlp(const char* op, const at::Tensor& ref, const char* ref_name, at::TensorList weights,
                           at::TensorList biases) {
  MlpArgs args;
  args.batched = ref.dim() == 3;
  args.scenarios = args.batched ? ref.size(0) : 1;
  args.dim = ref.size(-1);
  TORCH_CHECK(!weights.empty(), op, ": weights must hold at least one layer, got none");
  TORCH_CHECK(weights.size() == biases.size(), op, ": len(weights) = ", weights.size(), " but len(biases) = ",
              biases.size(), "; every layer needs one weight and one bias");
  TORCH_CHECK(weights.size() <= static_cast<size_t>(kMaxLayers), op, ": the MLP may have at most ", kMaxLayers,
              " layers (the kernels pass per-layer pointers in fixed-size arrays), got len(weights) = ",
              weights.size());
  const int64_t weight_rank = args.batched ? 3 : 2;
  int64_t expected_in = 2 * args.dim;
  for (size_t l = 0; l < weights.size(); ++l) {
    const std::string wn = indexed("weights", l), bn = indexed("biases", l);
    const at::Tensor& w = weights[l];
    const at::Tensor& b = biases[l];
    check_like(w, ref, op, wn.c_str(), ref_name);
    check_like(b, ref, op, bn.c_str(), ref_name);
    TORCH_CHECK(w.dim() == weight_rank, op, ": ", wn, " must be ", (args.batched ? "[S, out, in]" : "[out, in]"),
                " to match ", ref_name, " of shape ", ref.sizes(), ", got shape ", w.sizes());
    TORCH_CHECK(b.dim() == weight_rank - 1, op, ": ", bn, " must be ", (args.batched ? "[S, out]" : "[out]"),
                " to match ", ref_name, " of shape ", ref.sizes(), ", got shape ", b.sizes());
    if (args.batched) {
      TORCH_CHECK(w.size(0) == args.scenarios, op, ": ", wn, " has S = ", w.size(0), " but ", ref_name, " has S = ",
                  args.scenarios);
      TORCH_CHECK(b.size(0) == args.scenarios, op, ": ", bn, " has S = ", b.size(0), " but ", ref_name, " has S = ",
                  args.scenarios);
    }
    const int64_t in = w.size(-1), out = w.size(-2);
    if (l == 0) {
      TORCH_CHECK(in == expected_in, op, ": ", wn, " takes ", in, " inputs but [e_u; e_i] has 2 * d = ", expected_in,
                  " (d = ", args.dim, " is the width of ", ref_name, ")");
    } else {
      TORCH_CHECK(in == expected_in, op, ": ", wn, " takes ", in, " inputs but ", indexed("weights", l - 1),
                  " gives ", expected_in, "; layer widths must chain");
    }
    TORCH_CHECK(out > 0, op, ": ", wn, " has no outputs, got shape ", w.sizes());
    TORCH_CHECK(b.size(-1) == out, op, ": ", bn, " has ", b.size(-1), " entries but ", wn, " has ", out,
                " outputs");
    expected_in = out;
    args.max_width = std::max({args.max_width, in, out});
    args.num_params += in * out + out;
    at::Tensor w3 = args.batched ? w : w.unsqueeze(0);
    at::Tensor b2 = args.batched ? b : b.unsqueeze(0);
    // Views of a flat theta keep [out, in] contiguous; anything else is copied once here.
    if (!(w3.stride(2) == 1 && (w3.stride(1) == in || out == 1))) w3 = w3.contiguous();
    if (!(b2.stride(1) == 1 || out == 1)) b2 = b2.contiguous();
    args.weights.push_back(w3);
    args.biases.push_back(b2);
  }
  TORCH_CHECK(expected_in == 1, op, ": the last layer, ", indexed("weights", weights.size() - 1), ", must have 1 output (the score), got ",
              expected_in);
  return args;
}

}  // namespace s2meta
