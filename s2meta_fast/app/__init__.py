"""The application: prepare → meta-train → evaluate → plot over a run folder.

The layer above the libraries (data, ops, models, meta, eval) and the configuration, below the
command line: :mod:`.commands` is what each ``s2meta`` command does, :mod:`.stages` the steps
they chain, :mod:`.run_folder` what they read and write in ``--out``.
"""
from . import compare as compare_study
from . import run_folder, stages
from .commands import Figure, compare, evaluate, headroom, plot, prepare, run, train
from .stages import eval_tasks, load_learner, prepare_data

__all__ = ["Figure", "compare", "compare_study", "eval_tasks", "evaluate", "headroom", "load_learner", "plot", "prepare",
           "prepare_data", "run", "run_folder",
           "stages", "train"]
