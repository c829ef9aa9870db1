// The s2meta op library: the Python module stub and every op schema, in one place.
//
// The extension exposes no Python functions of its own: importing s2meta_fast._C only loads
// this shared object, whose static initialisers register the schemas below and the CPU/CUDA
// kernels in csrc/ops/{cpu,cuda}. Everything is then reached as torch.ops.s2meta.<op>, which
// makes the ops visible to torch.compile, CUDA graphs and opcheck.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "ops/cpu/isa.h"

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "s2meta fused kernels (ops live in torch.ops.s2meta)", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(s2meta, m) {
  // Paper Eq. 12, elementwise: x -> (log|x|/p, sign x) if |x| >= e^-p else (-1, e^p x).
  m.def("grad_preprocess(Tensor x, float p=10.0) -> Tensor");

  // One coordinatewise-LSTM update step for a single parameter tensor (docs/spec.md §3).
  // Returns (theta_new, h_new, c_new, alpha, beta).
  m.def(
      "lstm_update(Tensor theta, Tensor grad, Tensor loss, Tensor h, Tensor c, Tensor w_ih, "
      "Tensor w_hh, Tensor b_ih, Tensor b_hh, Tensor? ln_weight, Tensor? ln_bias, Tensor w_gate, "
      "Tensor b_gate, float p=10.0, float clip=1.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Multi-tensor, multi-scenario form: the K parameter tensors of a recommender are
  // concatenated along the last dim of theta [S, N]; coordinates in
  // [offsets[k], offsets[k+1]) use controller k. S scenarios share the controllers and have
  // one loss each (loss [S]). h, c: [S, N, H]. Controller weights are stacked over K:
  // w_ih [K,4H,5], w_hh [K,4H,H], b_ih/b_hh [K,4H], ln_weight/ln_bias [K,H] or None,
  // w_gate [K,2,H], b_gate [K,2]. Returns (theta_new, h_new, c_new, alpha, beta).
  m.def(
      "lstm_update_multi(Tensor theta, Tensor grad, Tensor loss, Tensor h, Tensor c, int[] offsets, "
      "Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, Tensor? ln_weight, Tensor? ln_bias, "
      "Tensor w_gate, Tensor b_gate, float p=10.0, float clip=1.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Backward of lstm_update_multi; recomputes the forward's intermediates. Gradients w.r.t.
  // (theta, h, c, w_ih, w_hh, b_ih, b_hh, ln_weight, ln_bias, w_gate, b_gate); the LayerNorm
  // gradients are empty tensors when ln_weight is None. No gradient flows into grad or loss.
  m.def(
      "lstm_update_multi_backward(Tensor d_theta_new, Tensor d_h_new, Tensor d_c_new, "
      "Tensor d_alpha, Tensor d_beta, Tensor theta, Tensor grad, Tensor loss, Tensor h, Tensor c, "
      "int[] offsets, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, Tensor? ln_weight, "
      "Tensor? ln_bias, Tensor w_gate, Tensor b_gate, float p=10.0, float clip=1.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Interaction-module scoring of N (user, pos, neg) triples with the mean hinge loss
  // max(0, margin - f(u,pos) + f(u,neg)). weights[l]: [out, in], biases[l]: [out]; ReLU after
  // every layer but the last. With a leading scenario dim (embeddings [S,N,d], weights
  // [S,out,in], biases [S,out]) each scenario has its own parameters: loss [S], scores [S,N].
  m.def(
      "hinge_score(Tensor user_emb, Tensor pos_emb, Tensor neg_emb, Tensor[] weights, "
      "Tensor[] biases, float margin=1.0) -> (Tensor, Tensor, Tensor)");
  // Returns (d_weights, d_biases, d_user_emb, d_pos_emb, d_neg_emb). With emb_grad=False the
  // three embedding gradients are empty [0] tensors and not computed: the inner loop adapts only
  // the MLP, and the input gradient of the first (widest) layer is a quarter of the work.
  m.def(
      "hinge_score_backward(Tensor d_loss, Tensor d_pos_score, Tensor d_neg_score, Tensor user_emb, "
      "Tensor pos_emb, Tensor neg_emb, Tensor[] weights, Tensor[] biases, float margin=1.0, "
      "bool emb_grad=True) -> (Tensor[], Tensor[], Tensor, Tensor, Tensor)");

  // Forward and the loss's gradient in the backward's one fused pass (d_loss = 1 per scenario, no
  // score gradient): (loss, pos_score, neg_score, d_weights, d_biases). For a first-order inner
  // loop, which uses the gradient as a value; the op itself is not differentiable.
  m.def(
      "hinge_score_grad(Tensor user_emb, Tensor pos_emb, Tensor neg_emb, Tensor[] weights, Tensor[] biases, "
      "float margin=1.0) -> (Tensor, Tensor, Tensor, Tensor[], Tensor[])");

  // All-pairs scores for evaluation: out[a, b] = f(user_emb[a], item_emb[b]), with the first
  // layer split as W1 [e_u; e_i] = W1u e_u + W1i e_i so it costs A + B matvecs, not A * B.
  // A leading scenario dim is allowed as for hinge_score.
  m.def("score_matrix(Tensor user_emb, Tensor item_emb, Tensor[] weights, Tensor[] biases) -> Tensor");

  // The instruction set the CPU kernels run in: "avx512", "avx2" or "baseline" (ops/cpu/isa.h),
  // the widest this CPU supports, capped by the environment variable S2META_CPU_ISA.
  m.def("cpu_isa() -> str", [] { return std::string(s2meta::cpu::isa_name(s2meta::cpu::isa())); });
}
