"""Random interaction MLPs and embeddings for the scoring-op tests (hinge_score, score_matrix)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor


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
