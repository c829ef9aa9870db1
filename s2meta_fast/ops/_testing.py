"""Random arguments for lstm_update_multi, shared by the op tests, the controller tests and the benchmarks."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

DIFFERENTIABLE = ("theta", "h", "c", "w_ih", "w_hh", "b_ih", "b_hh", "ln_weight", "ln_bias", "w_gate", "b_gate")


def interaction_sizes(embed_dim: int) -> List[int]:
    """Sizes of the 8 tensors (weight, bias per layer) of the interaction MLP 2d -> d -> d/2 -> d/4 -> 1."""
    dims = [2 * embed_dim, embed_dim, embed_dim // 2, embed_dim // 4, 1]
    sizes = []
    for fan_in, fan_out in zip(dims, dims[1:]):
        sizes += [fan_out * fan_in, fan_out]
    return sizes


def make_multi_args(S: int, sizes: Sequence[int], H: int = 16, dtype=torch.float64, layer_norm: bool = True,
                    seed: int = 0, device="cpu", theta_scale: float = 0.5, grad_scale: float = 2.0) -> Dict:
    """Keyword arguments of lstm_update_multi in schema order, with plausible magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    K, N = len(sizes), sum(sizes)
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    return dict(theta=rnd(S, N, scale=theta_scale), grad=rnd(S, N, scale=grad_scale), loss=rnd(S).abs(),
                h=rnd(S, N, H, scale=0.5), c=rnd(S, N, H), offsets=offsets,
                w_ih=rnd(K, 4 * H, 5, scale=0.3), w_hh=rnd(K, 4 * H, H, scale=0.3),
                b_ih=rnd(K, 4 * H, scale=0.3), b_hh=rnd(K, 4 * H, scale=0.3),
                ln_weight=(rnd(K, H, scale=0.2) + 1) if layer_norm else None,
                ln_bias=rnd(K, H, scale=0.1) if layer_norm else None,
                w_gate=rnd(K, 2, H, scale=0.3), b_gate=rnd(K, 2), p=10.0, clip=1.0)


def cast(args: Dict, dtype=None, device=None) -> Dict:
    return {k: v.to(dtype=dtype or v.dtype, device=device or v.device) if isinstance(v, torch.Tensor) else v
            for k, v in args.items()}


def with_grad(args: Dict) -> Dict:
    """A copy whose differentiable tensors are fresh leaves that require grad."""
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone().requires_grad_(k in DIFFERENTIABLE)
        out[k] = v
    return out
