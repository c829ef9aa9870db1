"""Sample inputs for the ops, shared by the op tests, the controller tests and the benchmarks.

- lstm_update_multi: :func:`make_multi_args` (random arguments with plausible magnitudes),
  :func:`interaction_sizes`, :func:`with_grad`, :func:`cast`.
- The scoring ops (hinge_score, score_matrix): random interaction MLPs (:func:`make_mlp`),
  embeddings (:func:`make_embeddings`), flat-θ views and non-contiguous layouts, tolerances.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

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


# -- the scoring ops -------------------------------------------------------------------------


def widths(dim: int, layers: int) -> List[int]:
    """The interaction MLP's widths, 2d -> d -> d/2 -> ... -> 1, cut to `layers` layers."""
    return [2 * dim] + [max(1, dim >> k) for k in range(layers - 1)] + [1]


def make_mlp(dim: int, layers: int, scenarios: Optional[int], dtype: torch.dtype,
             seed: int = 0) -> Tuple[List[Tensor], List[Tensor]]:
    """nn.Linear-scaled weights [.., out, in] and biases [.., out]; a leading S dim when given."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if scenarios is None else (scenarios,)
    sizes = widths(dim, layers)
    weights, biases = [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = fan_in ** -0.5
        weights.append((torch.rand(*lead, fan_out, fan_in, generator=gen, dtype=dtype) * 2 - 1) * bound * 2)
        biases.append((torch.rand(*lead, fan_out, generator=gen, dtype=dtype) * 2 - 1) * bound)
    return weights, biases


def make_embeddings(count: int, rows: int, dim: int, scenarios: Optional[int], dtype: torch.dtype,
                    seed: int = 1) -> List[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lead = () if scenarios is None else (scenarios,)
    return [torch.randn(*lead, rows, dim, generator=gen, dtype=dtype) for _ in range(count)]


def flat_theta_views(weights: List[Tensor], biases: List[Tensor]) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """All tensors in one flat theta [S, N] (design.md), returned with per-tensor views of it.

    The views are not contiguous: their scenario stride is N, not the tensor's own size.
    """
    scenarios = weights[0].shape[0]
    pieces = [t.reshape(scenarios, -1) for pair in zip(weights, biases) for t in pair]
    theta = torch.cat(pieces, dim=1).clone()
    return (theta, *views_of(theta, [w.shape for w in weights], [b.shape for b in biases]))


def views_of(theta: Tensor, weight_shapes, bias_shapes) -> Tuple[List[Tensor], List[Tensor]]:
    """Per-tensor views of a flat theta [S, N], each weight followed by its bias."""
    weights, biases, offset = [], [], 0
    for w_shape, b_shape in zip(weight_shapes, bias_shapes):
        for shape, out in ((w_shape, weights), (b_shape, biases)):
            size = torch.Size(shape[1:]).numel()
            out.append(theta[:, offset:offset + size].view(shape))
            offset += size
    return weights, biases


def strided_rows(tensor: Tensor) -> Tensor:
    """The same values with a row stride twice the width (a column slice of a wider tensor)."""
    wide = torch.cat([tensor, torch.full_like(tensor, float("nan"))], dim=-1)
    return wide[..., :tensor.shape[-1]]


def transposed_storage(tensor: Tensor) -> Tensor:
    """The same values stored column-major in the last two dims (last-dim stride != 1)."""
    return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)


def tolerances(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
