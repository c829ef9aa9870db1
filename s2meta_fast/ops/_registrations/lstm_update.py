"""lstm_update_multi: fake shape functions and autograd (the fused backward op).

``lstm_update`` needs nothing here: it is a CompositeImplicitAutograd op over
``lstm_update_multi`` (csrc/ops/lstm_update_composite.cpp), so it inherits both.
"""
from __future__ import annotations

import torch

from ..limits import CUDA_MAX_CONTROLLERS, CUDA_MAX_HIDDEN

_FLOATS = (torch.float32, torch.float64)


def _check(op, theta, grad, loss, h, c, offsets, w_ih, w_hh, b_ih, b_hh, ln_weight, ln_bias, w_gate, b_gate):
    """The C++ kernels' checks, for fake tensors (torch.compile, meta) where no kernel runs."""
    named = dict(theta=theta, grad=grad, loss=loss, h=h, c=c, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh,
                 w_gate=w_gate, b_gate=b_gate)
    torch._check((ln_weight is None) == (ln_bias is None),
                 lambda: f"{op}: ln_weight and ln_bias must both be tensors or both be None")
    if ln_weight is not None:
        named.update(ln_weight=ln_weight, ln_bias=ln_bias)
    for name, t in named.items():
        torch._check(t.dtype in _FLOATS, lambda: f"{op}: {name} must be float32 or float64, got {t.dtype}")
        torch._check(t.dtype == theta.dtype,
                     lambda: f"{op}: {name} has dtype {t.dtype} but theta has dtype {theta.dtype}")
        torch._check(t.device == theta.device,
                     lambda: f"{op}: {name} is on {t.device} but theta is on {theta.device}")
    torch._check(theta.dim() == 2, lambda: f"{op}: theta must be 2-D [S, N], got shape {tuple(theta.shape)}")
    S, N = theta.shape
    torch._check(h.dim() == 3 and h.shape[0] == S and h.shape[1] == N,
                 lambda: f"{op}: h must have shape [S, N, H] = [{S}, {N}, H], got {tuple(h.shape)}")
    H = h.shape[2]
    K = len(offsets) - 1
    torch._check(K >= 0 and offsets[0] == 0 and offsets[-1] == N,
                 lambda: f"{op}: offsets must run from 0 to N = {N}, got {list(offsets)}")
    if theta.device.type == "cuda":
        torch._check(H <= CUDA_MAX_HIDDEN,
                     lambda: f"{op}: the CUDA kernels support hidden sizes up to {CUDA_MAX_HIDDEN}, got H = {H}")
        torch._check(K <= CUDA_MAX_CONTROLLERS,
                     lambda: f"{op}: the CUDA kernels take at most {CUDA_MAX_CONTROLLERS} controllers, got K = {K}")
    torch._check(tuple(w_ih.shape) == (K, 4 * H, 5),
                 lambda: f"{op}: w_ih must have shape [K, 4H, 5] = [{K}, {4 * H}, 5], got {tuple(w_ih.shape)}")


@torch.library.register_fake("s2meta::lstm_update_multi")
def _fake(theta, grad, loss, h, c, offsets, w_ih, w_hh, b_ih, b_hh, ln_weight, ln_bias, w_gate, b_gate,
          p=10.0, clip=1.0):
    _check("lstm_update_multi", theta, grad, loss, h, c, offsets, w_ih, w_hh, b_ih, b_hh, ln_weight, ln_bias,
           w_gate, b_gate)
    return (torch.empty_like(theta), torch.empty_like(h), torch.empty_like(c), torch.empty_like(theta),
            torch.empty_like(theta))


@torch.library.register_fake("s2meta::lstm_update_multi_backward")
def _fake_backward(d_theta_new, d_h_new, d_c_new, d_alpha, d_beta, theta, grad, loss, h, c, offsets,
                   w_ih, w_hh, b_ih, b_hh, ln_weight, ln_bias, w_gate, b_gate, p=10.0, clip=1.0):
    _check("lstm_update_multi_backward", theta, grad, loss, h, c, offsets, w_ih, w_hh, b_ih, b_hh, ln_weight,
           ln_bias, w_gate, b_gate)
    return (torch.empty_like(theta), torch.empty_like(h), torch.empty_like(c), torch.empty_like(w_ih),
            torch.empty_like(w_hh), torch.empty_like(b_ih), torch.empty_like(b_hh),
            theta.new_empty(0) if ln_weight is None else torch.empty_like(ln_weight),
            theta.new_empty(0) if ln_bias is None else torch.empty_like(ln_bias),
            torch.empty_like(w_gate), torch.empty_like(b_gate))


def _setup_context(ctx, inputs, output):
    (theta, grad, loss, h, c, offsets, w_ih, w_hh, b_ih, b_hh, ln_weight, ln_bias, w_gate, b_gate, p, clip) = inputs
    ctx.offsets, ctx.p, ctx.clip = list(offsets), p, clip
    ctx.has_ln = ln_weight is not None
    saved = [theta, grad, loss, h, c, w_ih, w_hh, b_ih, b_hh, w_gate, b_gate]
    if ctx.has_ln:
        saved += [ln_weight, ln_bias]
    ctx.save_for_backward(*saved)


def _backward(ctx, d_theta_new, d_h_new, d_c_new, d_alpha, d_beta):
    saved = ctx.saved_tensors
    theta, grad, loss, h, c, w_ih, w_hh, b_ih, b_hh, w_gate, b_gate = saved[:11]
    ln_weight, ln_bias = (saved[11], saved[12]) if ctx.has_ln else (None, None)
    grads = torch.ops.s2meta.lstm_update_multi_backward(
        d_theta_new, d_h_new, d_c_new, d_alpha, d_beta, theta, grad, loss, h, c, ctx.offsets,
        w_ih, w_hh, b_ih, b_hh, ln_weight, ln_bias, w_gate, b_gate, ctx.p, ctx.clip)
    d_theta, d_h, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_ln_w, d_ln_b, d_w_gate, d_b_gate = grads
    if not ctx.has_ln:
        d_ln_w = d_ln_b = None
    # grad and loss only feed the stop-gradient features (first order): no gradient.
    return (d_theta, None, None, d_h, d_c, None, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_ln_w, d_ln_b,
            d_w_gate, d_b_gate, None, None)


torch.library.register_autograd("s2meta::lstm_update_multi", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("s2meta::lstm_update_multi_backward is not differentiable: the meta-gradient is first "
                       "order (docs/spec.md §3), so double backward through the update controller is not supported")


def _setup_nothing(ctx, inputs, output):
    pass


torch.library.register_autograd("s2meta::lstm_update_multi_backward", _no_double_backward,
                                setup_context=_setup_nothing)
