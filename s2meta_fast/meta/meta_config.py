"""MetaConfig: every knob of the meta learner, checked when built."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

INIT_MODES = ("learned", "random")
UPDATE_MODES = ("lstm", "sgd")
STOP_MODES = ("sample", "threshold", "fixed")
STATE_INITS = ("zeros", "normal")


@dataclass(frozen=True)
class MetaConfig:
    """The meta learner's settings (docs/spec.md §3-5); defaults reproduce the paper and authors' code.

    Attributes:
        hidden_size: H, the update controller's LSTM width per coordinate.
        p: Eq. 12 preprocessing constant.
        clip: gradient clamp inside the update controller.
        t_max: most inner updates per scenario.
        t_min: the first ``t_min`` steps never stop.
        init: "learned" (θ⁽⁰⁾ = ω_R) or "random" (RandInit ablation: a fresh nn.Linear init per scenario).
        update: "lstm" (update controller) or "sgd" (FixedLr ablation: θ' = θ − inner_lr ∇).
        inner_lr: the FixedLr learning rate.
        stop: "sample" (Bernoulli(p), REINFORCE-trained), "threshold" (stop when p > stop_threshold)
            or "fixed" (FixedStep ablation: always ``steps`` updates, no stop controller).
        steps: the number of updates when ``stop == "fixed"``.
        stop_threshold: the threshold of ``stop == "threshold"``.
        layer_norm: LayerNorm on the update controller's hidden state (authors' code).
        forget_bias_fix: put the authors' bias-1 init into the forget gate (see UpdateController).
        zero_hh_bias: also zero ``b_hh`` on the slice that gets the +1 (the authors' code), so the
            slice's total bias is exactly 1 rather than 1 + U(±1/√H).
        state_init: initial value of the update controller's learned h₀, c₀: "zeros" (ours) or
            "normal" (N(0, 1), the authors' code).
        inner_batch: support pairs per inner step: None uses each of the scenario's support
            pairs once (ours); an int draws that many uniformly *with replacement* (the
            authors' MovieLens setting is 128).
        fused: FastUpdateController and the fused scoring ops instead of the pure-PyTorch twins.
        margin: hinge-loss margin.
    """

    hidden_size: int = 16
    p: float = 10.0
    clip: float = 1.0
    t_max: int = 20
    t_min: int = 4
    init: str = "learned"
    update: str = "lstm"
    inner_lr: float = 0.01
    stop: str = "sample"
    steps: int = 20
    stop_threshold: float = 0.5
    layer_norm: bool = True
    forget_bias_fix: bool = False
    zero_hh_bias: bool = False
    state_init: str = "zeros"
    inner_batch: Optional[int] = None
    fused: bool = True
    margin: float = 1.0

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"MetaConfig: {message}")

        need(self.init in INIT_MODES, f"init must be one of {INIT_MODES}, got {self.init!r}")
        need(self.update in UPDATE_MODES, f"update must be one of {UPDATE_MODES}, got {self.update!r}")
        need(self.stop in STOP_MODES, f"stop must be one of {STOP_MODES}, got {self.stop!r}")
        need(isinstance(self.hidden_size, int) and self.hidden_size > 0,
             f"hidden_size must be a positive int, got {self.hidden_size!r}")
        need(self.p > 0, f"p must be positive, got {self.p}")
        need(self.clip > 0, f"clip must be positive, got {self.clip}")
        need(isinstance(self.t_max, int) and self.t_max >= 1, f"t_max must be an int >= 1, got {self.t_max!r}")
        need(isinstance(self.t_min, int) and 0 <= self.t_min <= self.t_max,
             f"t_min must be an int in [0, t_max={self.t_max}], got {self.t_min!r}")
        need(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps!r}")
        need(self.inner_lr > 0, f"inner_lr must be positive, got {self.inner_lr}")
        need(0.0 < self.stop_threshold < 1.0, f"stop_threshold must lie in (0, 1), got {self.stop_threshold}")
        need(self.margin > 0, f"margin must be positive, got {self.margin}")
        need(self.state_init in STATE_INITS, f"state_init must be one of {STATE_INITS}, got {self.state_init!r}")
        need(self.inner_batch is None or (isinstance(self.inner_batch, int) and not isinstance(self.inner_batch, bool)
                                          and self.inner_batch >= 1),
             f"inner_batch must be a positive int or null, got {self.inner_batch!r}")

    def loop_length(self, stop: str | None = None) -> int:
        """Inner steps the loop runs under stop mode `stop` (default: ``self.stop``)."""
        return self.steps if (stop or self.stop) == "fixed" else self.t_max

    def replace(self, **changes) -> "MetaConfig":
        return dataclasses.replace(self, **changes)
