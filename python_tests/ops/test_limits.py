"""Sizes the kernels cannot take fail early, with a message naming the limit."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import s2meta_fast
from s2meta_fast.config import ConfigError, build_config
from s2meta_fast.meta.update_controller import FastUpdateController
from s2meta_fast.ops import limits
from s2meta_fast.ops.sample_inputs import make_embeddings

ROOT = Path(__file__).resolve().parents[2]
needs_kernels = pytest.mark.skipif(not s2meta_fast.backend().cpu_kernels, reason="compiled CPU kernels not built")


def _constant(path: str, name: str) -> int:
    match = re.search(rf"constexpr\s+(?:int|int64_t)\s+{name}\s*=\s*(\d+);", (ROOT / path).read_text())
    assert match, f"{name} not found in {path}"
    return int(match.group(1))


def test_python_limits_match_the_kernels():
    assert limits.MAX_MLP_LAYERS == _constant("csrc/ops/mlp_args.h", "kMaxLayers")
    assert limits.CUDA_MAX_HIDDEN == _constant("csrc/ops/cuda/lstm_update_kernel.cu", "kMaxHiddenCuda")
    assert limits.CUDA_MAX_CONTROLLERS == _constant("csrc/ops/lstm_update.h", "kMaxControllersCuda")
    for path in ("csrc/ops/cuda/hinge_score_kernel.cu", "csrc/ops/cuda/score_matrix_kernel.cu"):
        assert f"S <= {limits.CUDA_MAX_SCENARIOS}" in (ROOT / path).read_text()


def _mlp(layers: int, dim: int = 8, device="cpu"):
    widths = [2 * dim] + [dim] * (layers - 1) + [1]
    weights = [torch.randn(o, i, device=device) for i, o in zip(widths, widths[1:])]
    return weights, [torch.randn(w.shape[0], device=device) for w in weights]


@needs_kernels
@pytest.mark.parametrize("op", ["hinge_score", "hinge_score_grad", "hinge_score_backward", "score_matrix"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_more_layers_than_the_kernels_hold_is_an_error(op, device):
    """17 layers used to overrun the kernels' fixed-size per-layer arrays (memory corruption)."""
    weights, biases = _mlp(limits.MAX_MLP_LAYERS + 1, device=device)
    user, pos, neg = (e.to(device) for e in make_embeddings(3, 4, 8, None, torch.float32))
    call = {
        "hinge_score": lambda: torch.ops.s2meta.hinge_score(user, pos, neg, weights, biases, 1.0),
        "hinge_score_grad": lambda: torch.ops.s2meta.hinge_score_grad(user, pos, neg, weights, biases, 1.0),
        "hinge_score_backward": lambda: torch.ops.s2meta.hinge_score_backward(
            torch.ones((), device=device), torch.ones(4, device=device), torch.ones(4, device=device), user, pos, neg,
            weights, biases, 1.0, True),
        "score_matrix": lambda: torch.ops.s2meta.score_matrix(user, pos, weights, biases),
    }[op]
    with pytest.raises(RuntimeError, match=rf"{op}: the MLP may have at most 16 layers.*got len\(weights\) = 17"):
        call()


@needs_kernels
def test_the_most_layers_the_kernels_hold_still_run():
    weights, biases = _mlp(limits.MAX_MLP_LAYERS)
    user, pos, neg = make_embeddings(3, 4, 8, None, torch.float32)
    loss, _, _ = torch.ops.s2meta.hinge_score(user, pos, neg, weights, biases, 1.0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("options, message", [
    ({"hidden_size": 32}, r"hidden_size = 32 exceeds the CUDA kernels' limit of 16 \(CUDA_MAX_HIDDEN\)"),
    ({"meta_batch": 70000}, r"70000 scenarios in one call exceed the CUDA kernels' limit of 65535"),
])
def test_config_rejects_sizes_the_cuda_kernels_cannot_take(options, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"device": "cuda", **options})


def test_config_allows_them_where_no_cuda_kernel_runs():
    build_config({"device": "cpu", "hidden_size": 32})
    build_config({"device": "cuda", "hidden_size": 32, "fused": False})
    build_config({"device": "cuda", "hidden_size": 32, "update": "sgd"})


def test_fused_controller_rejects_a_cuda_placement_it_cannot_run():
    controller = FastUpdateController([(3, 4), (4,)], hidden_size=32)
    controller.check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"FastUpdateController: hidden_size = 32 exceeds .* limit of 16"):
        controller.check_device(torch.device("cuda"))
    many = FastUpdateController([(2,)] * 65, hidden_size=4)
    with pytest.raises(ValueError, match=r"65 parameter tensors exceed the CUDA kernels' limit of 64"):
        many.check_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_controller_fails_when_moved_to_the_gpu():
    with pytest.raises(ValueError, match="CUDA_MAX_HIDDEN"):
        FastUpdateController([(3, 4)], hidden_size=32).cuda()
