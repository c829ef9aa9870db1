"""A finished `s2meta run` folder, loaded for the studies that re-evaluate its learner."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Tuple

import torch

from s2meta_fast.app import load_learner, prepare_data
from s2meta_fast.config import build_config, load_yaml
from s2meta_fast.data.tasks import support_batch
from s2meta_fast.eval.baselines import S2Meta
from s2meta_fast.eval.protocol import evaluate_step_counts


def load_run(out_dir: str, script: str) -> Tuple[Any, Any, Any]:
    """(config, prepared data, learner at ``best.pt`` on the CPU in eval mode) of `out_dir`;
    a folder without a run exits with a message that names `script`."""
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.exists(path):
        raise SystemExit(f"{script}: {out_dir} holds no run (no config.yaml)")
    cfg = build_config(load_yaml(path), {"out": out_dir, "quiet": True, "device": "cpu"}, where=out_dir)
    prepared = prepare_data(cfg)
    return cfg, prepared, load_learner(cfg, prepared).cpu().eval()


def fixed_step_results(cfg: Any, learner: Any, tasks: Any, steps: Any, ks: Any = (20,)) -> Dict[int, Dict[str, Any]]:
    """``{t: evaluate(...) result}`` of ω_R plus t fixed updates of the learned update controller,
    for every t in `steps`, from one T_max-step loop per block (the draws of the run's protocol)."""
    t_max = max(steps)
    scorer = S2Meta(learner, stop="fixed", cuda_graphs=False)

    def fit(group, generator, wanted):
        saved, learner.config = learner.config, dataclasses.replace(learner.config, steps=t_max)
        try:
            batch = support_batch(list(group))
            with torch.no_grad():
                out = learner.adapt(batch, stop="fixed", noise=learner.draw_noise(batch, generator, "fixed"),
                                    record=True)
        finally:
            learner.config = saved
        return {t: out.trajectory.thetas[t] for t in wanted}

    return evaluate_step_counts("s2meta-fixed", fit, scorer.score, tasks, list(steps), ks, seed=cfg.run.seed,
                                device=torch.device("cpu"), block_size=cfg.eval.block_size)
