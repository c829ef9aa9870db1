"""grad_preprocess: fake shape function and autograd (d/dx of Eq. 12)."""
from __future__ import annotations

import math

import torch


@torch.library.register_fake("s2meta::grad_preprocess")
def _fake(x, p=10.0):
    torch._check(x.dtype in (torch.float32, torch.float64),
                 lambda: f"grad_preprocess: x must be float32 or float64, got {x.dtype}")
    return x.new_empty(*x.shape, 2)


def _setup_context(ctx, inputs, output):
    x, p = inputs
    ctx.save_for_backward(x)
    ctx.p = p


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    p = ctx.p
    large = x.abs() >= math.exp(-p)
    # log branch: d(log|x|/p)/dx = 1/(p x); the sign part is flat. Linear branch: (0, e^p).
    d_log = torch.where(large, grad_out[..., 0] / (p * x), torch.zeros_like(x))
    d_lin = torch.where(large, torch.zeros_like(x), grad_out[..., 1] * math.exp(p))
    return d_log + d_lin, None


torch.library.register_autograd("s2meta::grad_preprocess", _backward, setup_context=_setup_context)
