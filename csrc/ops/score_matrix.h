// score_matrix argument checks, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include "ops/mlp_args.h"

namespace s2meta {

struct ScoreMatrixInputs {
  MlpArgs mlp;
  at::Tensor users, items;  // [S, A, d], [S, B, d], rows contiguous
};

inline ScoreMatrixInputs prepare_score_matrix(const char* op, const at::Tensor& user_emb, const at::Tensor& item_emb,
                                              at::TensorList weights, at::TensorList biases) {
  check_embedding(user_emb, op, "user_emb", user_emb, "user_emb");
  check_embedding(item_emb, op, "item_emb", user_emb, "user_emb");
  ScoreMatrixInputs in;
  in.mlp = prepare_mlp(op, user_emb, "user_emb", weights, biases);
  in.users = prepare_embedding(user_emb);
  in.items = prepare_embedding(item_emb);
  return in;
}

}  // namespace s2meta
