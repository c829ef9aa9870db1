"""The application: prepare → meta-train → evaluate → plot over a run folder, then export and recommend.

The layer above the libraries (data, ops, models, meta, eval) and the configuration, below the
command line: :mod:`.commands` is what each ``s2meta`` command does, :mod:`.stages` the steps
they chain, :mod:`.run_folder` what they read and write in ``--out``, :mod:`.recommender` a
trained meta learner serving new scenarios and :mod:`.model_file` its portable file.
"""
from . import compare as compare_study
from . import run_folder, stages
from .commands import Figure, Recommendations, compare, evaluate, export, headroom, plot, prepare, recommend, run, train
from .stages import eval_tasks, load_learner, prepare_data

__all__ = ["Figure", "Recommendations", "compare", "compare_study", "eval_tasks", "evaluate", "export", "headroom",
           "load_learner", "plot", "prepare", "prepare_data", "recommend", "run", "run_folder", "stages", "train"]
