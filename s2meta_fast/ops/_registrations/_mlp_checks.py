"""Checks the fake (meta) implementations of the scoring ops share with their C++ kernels.

The kernels validate everything in ``csrc/ops/mlp_args.h``; under ``torch.compile`` the fakes run
instead, and must reject the same malformed calls rather than trace a graph that fails later.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..limits import CUDA_MAX_SCENARIOS, MAX_MLP_LAYERS


def check_mlp(op: str, ref: Tensor, ref_name: str, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> None:
    """Raises if `weights`/`biases` do not form an MLP from [e_u; e_i] (width 2d of `ref`) to 1."""
    torch._check(ref.dtype in (torch.float32, torch.float64),
                 lambda: f"{op}: {ref_name} must be float32 or float64, got {ref.dtype}")
    torch._check(ref.dim() in (2, 3), lambda: f"{op}: {ref_name} must be [n, d] or [S, n, d], got {tuple(ref.shape)}")
    torch._check(len(weights) > 0, lambda: f"{op}: weights must hold at least one layer, got none")
    torch._check(len(weights) == len(biases),
                 lambda: f"{op}: len(weights) = {len(weights)} but len(biases) = {len(biases)}")
    torch._check(len(weights) <= MAX_MLP_LAYERS,
                 lambda: f"{op}: the MLP may have at most {MAX_MLP_LAYERS} layers, got len(weights) = {len(weights)}")
    batched = ref.dim() == 3
    if batched and ref.device.type == "cuda":
        torch._check(ref.shape[0] <= CUDA_MAX_SCENARIOS,
                     lambda: f"{op}: at most {CUDA_MAX_SCENARIOS} scenarios per call on CUDA, got S = {ref.shape[0]}")
    width = 2 * ref.shape[-1]
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        for name, tensor, rank in ((f"weights[{layer}]", weight, 2 + batched), (f"biases[{layer}]", bias, 1 + batched)):
            torch._check(tensor.dtype == ref.dtype,
                         lambda: f"{op}: {name} has dtype {tensor.dtype} but {ref_name} has dtype {ref.dtype}")
            torch._check(tensor.device == ref.device,
                         lambda: f"{op}: {name} is on {tensor.device} but {ref_name} is on {ref.device}")
            torch._check(tensor.dim() == rank, lambda: f"{op}: {name} must be {rank}-D, got {tuple(tensor.shape)}")
            if batched:
                torch._check(tensor.shape[0] == ref.shape[0],
                             lambda: f"{op}: {name} has S = {tensor.shape[0]} but {ref_name} has S = {ref.shape[0]}")
        torch._check(weight.shape[-1] == width,
                     lambda: f"{op}: weights[{layer}] takes {weight.shape[-1]} inputs, expected {width}")
        torch._check(bias.shape[-1] == weight.shape[-2],
                     lambda: f"{op}: biases[{layer}] has {bias.shape[-1]} entries, expected {weight.shape[-2]}")
        width = weight.shape[-2]
    torch._check(width == 1, lambda: f"{op}: the last layer must have 1 output (the score), got {width}")


def check_embedding(op: str, tensor: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    """Raises unless `tensor` matches `ref` in dtype, device, rank, width and scenario count."""
    torch._check(tensor.dtype == ref.dtype,
                 lambda: f"{op}: {name} has dtype {tensor.dtype} but {ref_name} has dtype {ref.dtype}")
    torch._check(tensor.device == ref.device,
                 lambda: f"{op}: {name} is on {tensor.device} but {ref_name} is on {ref.device}")
    torch._check(tensor.dim() == ref.dim(),
                 lambda: f"{op}: {name} has shape {tuple(tensor.shape)} but {ref_name} has {tuple(ref.shape)}")
    torch._check(tensor.shape[-1] == ref.shape[-1],
                 lambda: f"{op}: {name} has width {tensor.shape[-1]} but {ref_name} has {ref.shape[-1]}")
    if ref.dim() == 3:
        torch._check(tensor.shape[0] == ref.shape[0],
                     lambda: f"{op}: {name} has S = {tensor.shape[0]} but {ref_name} has S = {ref.shape[0]}")
