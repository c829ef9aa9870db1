"""What the emulated CUDA kernels are run on: every op and backward, against the reference twin.

The shapes are those the GPU tests use, shrunk where a size only serves to reach a code path that
a lowered grid cap (a knob, see emu_build.py) reaches with less work. Each case returns a list of
``(name, got, want)`` comparisons, or raises; ``LIMIT_CASES`` must raise with the given message.
Imported both by the pytest process (names only) and by the sanitized worker (which runs them).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from s2meta_fast.ops import reference as ref
from s2meta_fast.ops.sample_inputs import (DIFFERENTIABLE, flat_theta_views, make_embeddings,
                                           make_mlp, make_multi_args, tolerances)

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
SCHEDULES = ("forward", "reverse")
SM90_SHARED = 227 * 1024
SM80_SHARED = 163 * 1024

Comparison = Tuple[str, torch.Tensor, torch.Tensor]


def up(value):
    """The reference runs in float64 on the kernel's own inputs, so an fp32 case measures the
    kernel's rounding alone (fp32 against an fp32 reference would add the reference's)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    if isinstance(value, (list, tuple)):
        return [up(v) for v in value]
    return value


class Case:
    def __init__(self, name: str, run: Callable[[torch.dtype], List[Comparison]], knobs: Optional[Dict] = None,
                 shared: int = SM90_SHARED, dtypes=tuple(DTYPES)):
        self.name, self.run, self.knobs, self.shared, self.dtypes = name, run, knobs or {}, shared, dtypes


def emu():
    return torch.ops.s2meta_emu


# ---- grad_preprocess ------------------------------------------------------------------------
def _grad_preprocess(n: int, p: float):
    def run(dtype):
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, generator=gen, dtype=torch.float64) * torch.logspace(-8, 3, n, dtype=torch.float64)
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-30, -1e-30], dtype=torch.float64)
        x = torch.cat([x, special])[:n].to(dtype)
        return [("out", emu().grad_preprocess(x, p), ref.grad_preprocess(up(x), p))]
    return run


# ---- lstm_update_multi and its backward -----------------------------------------------------
def _lstm(S: int, sizes, H: int = 16, layer_norm: bool = True, seed: int = 0):
    def run(dtype):
        args = make_multi_args(S=S, sizes=sizes, H=H, dtype=dtype, layer_norm=layer_norm, seed=seed)
        out = emu().lstm_update_multi(*args.values())
        leaves = {k: (up(v).requires_grad_(k in DIFFERENTIABLE) if isinstance(v, torch.Tensor) else v)
                  for k, v in args.items()}
        want = ref.lstm_update_multi(*leaves.values())
        names = ("theta_new", "h_new", "c_new", "alpha", "beta")
        result = [(n, g, w.detach()) for n, g, w in zip(names, out, want)]
        gen = torch.Generator().manual_seed(seed + 100)
        ups = [torch.randn(w.shape, generator=gen, dtype=torch.float64).to(dtype) for w in want]
        grads = emu().lstm_update_multi_backward(*ups, *args.values())
        inputs = [k for k in DIFFERENTIABLE if leaves[k] is not None]
        if any(w.requires_grad for w in want):
            total = sum((w * up(u)).sum() for w, u in zip(want, ups))
            wanted = torch.autograd.grad(total, [leaves[k] for k in inputs], allow_unused=True)
        else:
            wanted = [None] * len(inputs)
        by_name = dict(zip(("theta", "h", "c", "w_ih", "w_hh", "b_ih", "b_hh", "ln_weight", "ln_bias", "w_gate",
                            "b_gate"), grads))
        for k, w in zip(inputs, wanted):
            result.append((f"d_{k}", by_name[k], torch.zeros_like(leaves[k]) if w is None else w))
        return result
    return run


# ---- hinge_score, its backward and the fused loss-and-grad ----------------------------------
def _hinge(S, N, d, L, flat=False, seed=0):
    def run(dtype):
        weights, biases = make_mlp(d, L, S, dtype, seed=seed)
        if flat:
            _, weights, biases = flat_theta_views(weights, biases)
        user, pos, neg = make_embeddings(3, N, d, S, dtype, seed=seed + 1)
        result = []
        loss, ps, ns = emu().hinge_score(user, pos, neg, weights, biases, 1.0)
        leaves = [up(t).requires_grad_() for t in [user, pos, neg, *weights, *biases]]
        w_loss, w_ps, w_ns = ref.hinge_score(*leaves[:3], leaves[3:3 + L], leaves[3 + L:], 1.0)
        result += [("loss", loss, w_loss.detach()), ("pos_score", ps, w_ps.detach()), ("neg_score", ns, w_ns.detach())]

        gen = torch.Generator().manual_seed(seed + 7)
        d_loss = torch.randn(w_loss.shape, generator=gen, dtype=torch.float64).to(dtype)
        d_pos = torch.randn(w_ps.shape, generator=gen, dtype=torch.float64).to(dtype)
        d_neg = torch.randn(w_ns.shape, generator=gen, dtype=torch.float64).to(dtype)
        total = (w_loss * up(d_loss)).sum() + (w_ps * up(d_pos)).sum() + (w_ns * up(d_neg)).sum()
        wanted = torch.autograd.grad(total, leaves, allow_unused=True)
        wanted = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, wanted)]
        for emb_grad in (True, False):
            dw, db, du, dp, dn = emu().hinge_score_backward(d_loss, d_pos, d_neg, user, pos, neg, weights, biases,
                                                           1.0, emb_grad)
            tag = "backward" if emb_grad else "backward(no emb)"
            if emb_grad:
                result += [(f"{tag} d_user", du, wanted[0]), (f"{tag} d_pos", dp, wanted[1]),
                           (f"{tag} d_neg", dn, wanted[2])]
            result += [(f"{tag} d_weights[{l}]", g, w) for l, (g, w) in enumerate(zip(dw, wanted[3:3 + L]))]
            result += [(f"{tag} d_biases[{l}]", g, w) for l, (g, w) in enumerate(zip(db, wanted[3 + L:]))]

        got = emu().hinge_score_grad(user, pos, neg, weights, biases, 1.0)
        want = ref.hinge_score_grad(up(user), up(pos), up(neg), up(weights), up(biases), 1.0)
        for name, g, w in zip(("grad loss", "grad pos_score", "grad neg_score"), got[:3], want[:3]):
            result.append((name, g, w))
        for part, (gs, ws) in (("d_weights", (got[3], want[3])), ("d_biases", (got[4], want[4]))):
            result += [(f"grad {part}[{l}]", g, w) for l, (g, w) in enumerate(zip(gs, ws))]
        return result
    return run


# ---- score_matrix ---------------------------------------------------------------------------
def _score_matrix(S, A, B, d, L, seed=0):
    def run(dtype):
        weights, biases = make_mlp(d, L, S, dtype, seed=seed)
        user, = make_embeddings(1, A, d, S, dtype, seed=seed + 1)
        item, = make_embeddings(1, B, d, S, dtype, seed=seed + 2)
        return [("scores", emu().score_matrix(user, item, weights, biases),
                 ref.score_matrix(up(user), up(item), up(weights), up(biases)))]
    return run


CASES: List[Case] = [
    Case("grad_preprocess/n1000", _grad_preprocess(1000, 10.0)),
    Case("grad_preprocess/n257-p3", _grad_preprocess(257, 3.0)),
    Case("grad_preprocess/empty", _grad_preprocess(0, 10.0)),
    Case("lstm/one_element", _lstm(1, [1])),
    Case("lstm/odd_segments", _lstm(1, [37, 1, 16, 100, 5], seed=1)),
    Case("lstm/scenarios", _lstm(3, [33, 2, 17], seed=2)),
    Case("lstm/empty_segment", _lstm(2, [5, 0, 19], seed=3)),
    Case("lstm/empty_theta", _lstm(2, [0], seed=4)),
    Case("lstm/no_layer_norm", _lstm(2, [20, 7], layer_norm=False, seed=5)),
    *[Case(f"lstm/hidden_{H}", _lstm(2, [9, 24], H=H, layer_norm=H > 1, seed=10 + H)) for H in range(1, 17)],
    Case("lstm/64_controllers", _lstm(1, [1, 0, 2] * 21 + [3], H=4, seed=6)),
    # Caps of 2 blocks per segment: both kernels loop over tiles (the grid-stride paths).
    Case("lstm/grid_stride", _lstm(2, [300, 7, 64], seed=7),
         knobs={"kMaxForwardBlocksPerSegment": 2, "kMaxBackwardBlocksPerSegment": 2}),
    Case("hinge/S1-N130-d64-L4", _hinge(None, 130, 64, 4)),
    Case("hinge/S3-N21-d128-L4", _hinge(3, 21, 128, 4, seed=1)),
    Case("hinge/S1-N5-d256-L4", _hinge(None, 5, 256, 4, seed=2)),
    Case("hinge/S1-N0-d8-L2", _hinge(1, 0, 8, 2, seed=3)),
    Case("hinge/S1-N9-d8-L1", _hinge(None, 9, 8, 1, seed=4)),
    Case("hinge/flat-theta-views", _hinge(3, 21, 16, 4, flat=True, seed=5)),
    # One backward block per scenario walks every chunk (the partial-gradient accumulation).
    Case("hinge/multi-chunk-backward", _hinge(3, 50, 16, 3, seed=6), knobs={"kMaxBackwardBlocks": 3}),
    # An A100's opt-in limit: d = 128 fp32 takes smaller tiles, fp64 falls back to global weights.
    Case("hinge/sm80-d128", _hinge(2, 9, 128, 4, seed=7), shared=SM80_SHARED),
    Case("score_matrix/S1-A7-B130-d64-L4", _score_matrix(None, 7, 130, 64, 4)),
    Case("score_matrix/S3-A7-B130-d128-L4", _score_matrix(3, 7, 130, 128, 4, seed=1)),
    Case("score_matrix/S2-A5-B9-d256-L4", _score_matrix(2, 5, 9, 256, 4, seed=2)),
    Case("score_matrix/S1-A3-B7-d8-L1", _score_matrix(None, 3, 7, 8, 1, seed=3)),
    Case("score_matrix/S2-A3-B65-d16-L2", _score_matrix(2, 3, 65, 16, 2, seed=4)),
    Case("score_matrix/S1-A7-B0-d8-L2", _score_matrix(1, 7, 0, 8, 2, seed=5)),
    Case("score_matrix/sm80-d256", _score_matrix(None, 2, 70, 256, 4, seed=6), shared=SM80_SHARED),
]


def _too_many_layers(op):
    def run(dtype):
        layers = 17
        weights = [torch.randn(8, 16, dtype=dtype)] + [torch.randn(8, 8, dtype=dtype)] * (layers - 2) + [
            torch.randn(1, 8, dtype=dtype)]
        biases = [torch.randn(w.shape[0], dtype=dtype) for w in weights]
        user, pos, neg = make_embeddings(3, 4, 8, None, dtype)
        if op == "hinge_score":
            emu().hinge_score(user, pos, neg, weights, biases, 1.0)
        elif op == "hinge_score_grad":
            emu().hinge_score_grad(user, pos, neg, weights, biases, 1.0)
        else:
            emu().score_matrix(user, pos, weights, biases)
        return []
    return run


def _lstm_call(**kw):
    def run(dtype):
        emu().lstm_update_multi(*make_multi_args(dtype=dtype, **kw).values())
        return []
    return run


# name -> (case, message the op must raise)
LIMIT_CASES: Dict[str, Tuple[Case, str]] = {
    "hinge_score/17_layers": (Case("", _too_many_layers("hinge_score"), dtypes=("fp32",)), r"at most 16 layers"),
    "hinge_score_grad/17_layers": (Case("", _too_many_layers("hinge_score_grad"), dtypes=("fp32",)),
                                   r"at most 16 layers"),
    "score_matrix/17_layers": (Case("", _too_many_layers("score_matrix"), dtypes=("fp32",)), r"at most 16 layers"),
    "lstm/hidden_17": (Case("", _lstm_call(S=1, sizes=[3], H=17), dtypes=("fp32",)), r"hidden sizes up to 16"),
    "lstm/65_controllers": (Case("", _lstm_call(S=1, sizes=[1] * 65, H=4), dtypes=("fp32",)),
                            r"at most 64 controllers"),
}

# Deliberately broken kernels (build.py MUTANTS) and the case that must expose each.
MUTANT_CASES: Dict[str, Tuple[str, str]] = {
    "lstm_forward_missing_barrier": ("lstm/scenarios", "fp32"),
    "lstm_backward_missing_barrier": ("lstm/grid_stride", "fp32"),
    "score_matrix_missing_barrier": ("score_matrix/S1-A7-B130-d64-L4", "fp32"),
    "hinge_tail_off_by_one": ("hinge/S1-N130-d64-L4", "fp32"),
    "ignore_shared_optin": ("lstm/scenarios", "fp64"),
}

BY_NAME = {c.name: c for c in CASES}


# fp64: the op tests' tolerances. fp32 is measured against the float64 truth: sums over thousands
# of coordinates in the LSTM weight gradients and LayerNorm's rstd at small H reach a few 1e-5
# there, 1e-4 relative on values LayerNorm amplified to ~30 (the same bits under every thread
# schedule, so not a race); a broken kernel is off by O(1) or NaN.
TOLERANCES = {torch.float64: tolerances(torch.float64), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def compare(comparisons: List[Comparison], dtype: torch.dtype) -> Optional[str]:
    """None when every output matches the reference, else the first mismatch."""
    for name, got, want in comparisons:
        try:
            assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
            torch.testing.assert_close(got, want.to(got.dtype), **TOLERANCES[dtype], equal_nan=True)
        except AssertionError as e:
            return f"{name}: {e}"
    return None
