"""CUDA-graph capture of the whole inner loop.

The inner loop is launch-bound at the paper's sizes (a 10,881-scalar recommender, 64 pairs):
each of its T_max steps is a few dozen small kernels. Captured once per input shape and
replayed, a meta-step becomes one graph launch. Capture is possible because the loop has no
host synchronisation (stops are masks) and no RNG inside (all draws come in as
:class:`~s2meta_fast.meta.noise.InnerNoise`, copied into static buffers like the batch).

Where capture fails (CPU tensors, an op that syncs, an old driver) the runner logs why once and
runs the same function eagerly.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .learner import AdaptOutput, MetaLearner, MetaLossTerms
from .noise import InnerNoise

log = logging.getLogger(__name__)

BATCH_FIELDS = ("support_users", "support_items", "support_item_index", "pool", "pool_size",
                "query_users", "query_pos", "query_neg")
MODES = ("meta_step", "adapt")


def eager_meta_step(learner: MetaLearner, batch, noise: InnerNoise) -> MetaLossTerms:
    """meta_loss + backward: leaves the meta-gradient in ``p.grad`` (replacing what was there)."""
    for param in learner.parameters():
        param.grad = None
    terms = learner.meta_loss(batch, noise=noise)
    terms.total.backward()
    return terms.detach()


def padded_pool(batch) -> Tensor:
    """The pool padded (with its first item, like the data layer) to a power-of-two width, so
    batches whose largest scenario differs a little share one captured graph."""
    width = batch.pool.shape[1]
    bucket = 1 << max(width - 1, 0).bit_length()
    if bucket == width:
        return batch.pool
    return torch.cat([batch.pool, batch.pool[:, :1].expand(-1, bucket - width)], dim=1)


class _Captured:
    """One captured graph: static inputs, static outputs and (meta_step) static gradients."""

    def __init__(self, graph, inputs: Dict[str, Tensor], noise: InnerNoise, outputs, grads):
        self.graph, self.inputs, self.noise, self.outputs, self.grads = graph, inputs, noise, outputs, grads


class GraphedInnerLoop:
    """Runs ``meta_step`` (meta_loss + backward) or ``adapt`` through CUDA graphs.

    Args:
        learner: the MetaLearner (on a CUDA device for capture to be attempted).
        mode: "meta_step" (training: returns detached MetaLossTerms, gradients in ``p.grad``) or
            "adapt" (evaluation: returns AdaptOutput with θ and steps, no gradients).
        stop: stop mode for "adapt" (default: the learner's config).
        enabled: False forces eager execution.
        warmup: eager iterations on a side stream before capture (allocator and autograd warm-up).
        max_graphs: graphs kept (LRU), one per distinct input shape.
    """

    def __init__(self, learner: MetaLearner, mode: str = "meta_step", stop: Optional[str] = None,
                 enabled: bool = True, warmup: int = 2, max_graphs: int = 4):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.learner, self.mode, self.stop = learner, mode, stop or learner.config.stop
        self.warmup, self.max_graphs = warmup, max_graphs
        self.graphs: "OrderedDict[Tuple, _Captured]" = OrderedDict()
        self.fallback_reason: Optional[str] = None
        device = learner.user_emb.device
        if not enabled:
            self.fallback_reason = "CUDA graphs disabled"
        elif device.type != "cuda" or not torch.cuda.is_available():
            self.fallback_reason = f"learner is on {device}, CUDA graphs need a CUDA device"

    @property
    def active(self) -> bool:
        return self.fallback_reason is None

    def __call__(self, batch, noise: InnerNoise):
        if self.active:
            try:
                return self._replay(batch, noise)
            except Exception as error:  # capture is best-effort: any failure means eager from now on
                self.fallback_reason = f"capture failed: {type(error).__name__}: {error}"
                self.graphs.clear()
                log.warning("CUDA-graph inner loop unavailable (%s); running it eagerly", self.fallback_reason)
        return self._eager(batch, noise)

    # -- eager -----------------------------------------------------------------------------
    def _eager(self, batch, noise: InnerNoise):
        if self.mode == "meta_step":
            return eager_meta_step(self.learner, batch, noise)
        with torch.no_grad():
            out = self.learner.adapt(batch, stop=self.stop, noise=noise)
        return AdaptOutput(theta=out.theta, steps=out.steps, stop_logit=out.stop_logit, updated=out.updated)

    # -- graphs ----------------------------------------------------------------------------
    def _inputs(self, batch) -> Dict[str, Tensor]:
        inputs = {name: getattr(batch, name, None) for name in BATCH_FIELDS}
        if self.mode == "adapt":
            for name in ("query_users", "query_pos", "query_neg"):
                inputs[name] = None
        inputs["pool"] = padded_pool(batch)
        return {name: value for name, value in inputs.items() if value is not None}

    def _replay(self, batch, noise: InnerNoise):
        inputs = self._inputs(batch)
        key = (tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))
               + tuple((tuple(t.shape), t.dtype) for t in noise.tensors()))
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(inputs, noise)
            self.graphs[key] = captured
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
            log.info("captured the %s inner loop as a CUDA graph for shapes %s", self.mode, key)
        else:
            self.graphs.move_to_end(key)
            for name, tensor in inputs.items():
                captured.inputs[name].copy_(tensor, non_blocking=True)
            for static, fresh in zip(captured.noise.tensors(), noise.tensors()):
                static.copy_(fresh, non_blocking=True)
        for param, grad in captured.grads:
            param.grad = grad
        captured.graph.replay()
        return self._copy_outputs(captured.outputs)

    def _copy_outputs(self, outputs):
        if self.mode == "meta_step":
            terms: MetaLossTerms = outputs
            return MetaLossTerms(terms.total.clone(), terms.query_loss.clone(), terms.reinforce.clone(),
                                 terms.steps.clone())
        theta, steps, logit, updated = outputs
        return AdaptOutput(theta=theta.clone(), steps=steps.clone(), stop_logit=logit.clone(), updated=updated.clone())

    def _run_once(self, static_batch, static_noise: InnerNoise):
        if self.mode == "meta_step":
            terms = self.learner.meta_loss(static_batch, noise=static_noise)
            terms.total.backward()
            return terms.detach()
        with torch.no_grad():
            out = self.learner.adapt(static_batch, stop=self.stop, noise=static_noise)
        return out.theta, out.steps, out.stop_logit, out.updated

    def _capture(self, inputs: Dict[str, Tensor], noise: InnerNoise) -> _Captured:
        static_inputs = {name: tensor.clone() for name, tensor in inputs.items()}
        static_noise = InnerNoise(*(None if t is None else t.clone() for t in (noise.neg, noise.stop, noise.theta0,
                                                                                noise.pick)))
        static_batch = SimpleNamespace(**{name: static_inputs.get(name) for name in BATCH_FIELDS})
        params: List[torch.nn.Parameter] = [p for p in self.learner.parameters() if p.requires_grad]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                for param in params:
                    param.grad = None
                self._run_once(static_batch, static_noise)
        torch.cuda.current_stream().wait_stream(stream)
        for param in params:
            # None, not zeros: backward inside the capture then *assigns* fresh gradient buffers
            # from the graph's pool, which every replay overwrites (no accumulation across replays)
            param.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._run_once(static_batch, static_noise)
        grads = [(param, param.grad) for param in params] if self.mode == "meta_step" else []
        return _Captured(graph, static_inputs, static_noise, outputs, grads)
