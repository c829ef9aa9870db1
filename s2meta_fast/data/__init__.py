"""The data layer: raw formats -> scenarios, frozen embeddings and meta-learning tasks.

    data = prepare("ml100k", seed=0)                 # PreparedData, cached on disk
    sampler = TaskSampler(data, seed=0)
    batch = sampler.train_batch(data.train, S=8)     # docs/spec.md §5 training tasks
    tasks = sampler.eval_tasks(data.test)            # docs/spec.md §6 evaluation split
    adapt_in = support_batch(tasks)

See docs/data.md for every dataset's scenario definition and thresholds.
"""
from .errors import DataFileError, DataFormatError, EmptyDataError, UnknownDatasetError
from .prepared import PreparedData, Scenario, load_prepared, save_prepared
from .registry import DATASETS, DatasetSpec, available_datasets, prepare
from .scenarios import QUERY_SIZE, SUPPORT_SIZE, RawData
from .tasks import EvalTask, TaskBatch, TaskSampler, support_batch

__all__ = [
    "prepare", "available_datasets", "DATASETS", "DatasetSpec", "PreparedData", "Scenario", "RawData",
    "TaskSampler", "TaskBatch", "EvalTask", "support_batch", "SUPPORT_SIZE", "QUERY_SIZE",
    "DataFileError", "DataFormatError", "EmptyDataError", "UnknownDatasetError", "load_prepared", "save_prepared",
]
