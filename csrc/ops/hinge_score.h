// hinge_score, shared by the CPU and CUDA kernels: argument checks and the hinge itself.
//
// For triple n of scenario s, with f the ReLU MLP (no ReLU after the last layer):
//   pos = f([u; i+]),  neg = f([u; i-]),  m = margin - pos + neg,
//   loss[s] = sum_n max(0, m) / max(N, 1).
// Backward: with g = d_loss[s] / max(N, 1) where m > 0 (0 at m <= 0, as torch's relu),
//   d_pos_total = d_pos_score - g,  d_neg_total = d_neg_score + g,
// which then flow back through f by the chain rule (ReLU gradient 0 where its output is 0).
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <vector>

#include "host_device.h"
#include "ops/mlp_args.h"

namespace s2meta {

template <typename T>
S2META_HOST_DEVICE T hinge_value(T margin, T pos, T neg) {
  const T m = margin - pos + neg;
  return m < T(0) ? T(0) : m;  // NaN propagates, as torch.relu
}

// d loss / d (margin - pos + neg) for one triple; the upstream gradient is already divided by N.
template <typename T>
S2META_HOST_DEVICE T hinge_slope(T margin, T pos, T neg, T d_loss_over_n) {
  const T m = margin - pos + neg;
  return m <= T(0) ? T(0) : d_loss_over_n;
}

struct HingeInputs {
  MlpArgs mlp;
  at::Tensor user, pos, neg;  // [S, N, d], rows contiguous
  int64_t batch = 0;          // N triples per scenario
};

inline HingeInputs prepare_hinge(const char* op, const at::Tensor& user_emb, const at::Tensor& pos_emb,
                                 const at::Tensor& neg_emb, at::TensorList weights, at::TensorList biases) {
  check_embedding(user_emb, op, "user_emb", user_emb, "user_emb");
  check_embedding(pos_emb, op, "pos_emb", user_emb, "user_emb");
  check_embedding(neg_emb, op, "neg_emb", user_emb, "user_emb");
  const int64_t n = user_emb.size(-2);
  TORCH_CHECK(pos_emb.size(-2) == n, op, ": pos_emb has ", pos_emb.size(-2), " rows but user_emb has ", n,
              "; each triple needs one user, one positive and one negative");
  TORCH_CHECK(neg_emb.size(-2) == n, op, ": neg_emb has ", neg_emb.size(-2), " rows but user_emb has ", n,
              "; each triple needs one user, one positive and one negative");
  HingeInputs in;
  in.mlp = prepare_mlp(op, user_emb, "user_emb", weights, biases);
  in.user = prepare_embedding(user_emb);
  in.pos = prepare_embedding(pos_emb);
  in.neg = prepare_embedding(neg_emb);
  in.batch = n;
  return in;
}

// The upstream gradients as [S, N] / [S] contiguous tensors, checked against the forward's shapes.
inline void check_hinge_grads(const char* op, const HingeInputs& in, const at::Tensor& user_emb,
                              const at::Tensor& d_loss, const at::Tensor& d_pos, const at::Tensor& d_neg) {
  check_like(d_loss, user_emb, op, "d_loss", "user_emb");
  check_like(d_pos, user_emb, op, "d_pos_score", "user_emb");
  check_like(d_neg, user_emb, op, "d_neg_score", "user_emb");
  TORCH_CHECK(d_loss.numel() == in.mlp.scenarios, op, ": d_loss must have ", in.mlp.scenarios,
              " entries (one per scenario), got shape ", d_loss.sizes());
  TORCH_CHECK(d_pos.numel() == in.mlp.scenarios * in.batch, op, ": d_pos_score must have shape of pos_score (",
              in.mlp.scenarios, " x ", in.batch, "), got shape ", d_pos.sizes());
  TORCH_CHECK(d_neg.numel() == in.mlp.scenarios * in.batch, op, ": d_neg_score must have shape of neg_score (",
              in.mlp.scenarios, " x ", in.batch, "), got shape ", d_neg.sizes());
}

// An unbatched call (2-D embeddings) runs as S = 1; its outputs drop that dim again.
inline void drop_scenario_dim(bool batched, std::initializer_list<at::Tensor*> tensors) {
  if (batched) return;
  for (at::Tensor* t : tensors) {
    if (t->defined() && t->dim() > 0) *t = t->squeeze(0);
  }
}

inline void drop_scenario_dim(bool batched, std::vector<at::Tensor>& tensors) {
  if (batched) return;
  for (at::Tensor& t : tensors) t = t.squeeze(0);
}

}  // namespace s2meta
