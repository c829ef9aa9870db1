"""A finished `s2meta run` folder, loaded for the studies that re-evaluate its learner."""
from __future__ import annotations

import os
from typing import Any, Tuple

from s2meta_fast.app import load_learner, prepare_data
from s2meta_fast.config import build_config, load_yaml


def load_run(out_dir: str, script: str) -> Tuple[Any, Any, Any]:
    """(config, prepared data, learner at ``best.pt`` on the CPU in eval mode) of `out_dir`;
    a folder without a run exits with a message that names `script`."""
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.exists(path):
        raise SystemExit(f"{script}: {out_dir} holds no run (no config.yaml)")
    cfg = build_config(load_yaml(path), {"out": out_dir, "quiet": True, "device": "cpu"}, where=out_dir)
    prepared = prepare_data(cfg)
    return cfg, prepared, load_learner(cfg, prepared).cpu().eval()
