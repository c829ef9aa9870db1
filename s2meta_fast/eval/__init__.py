"""Evaluation: ranking metrics, the Table-3 protocol, baselines, results files."""
from .baselines import (Finetune, FinetuneGrid, GlobalModel, GlobalTrainConfig, ItemPop, S2Meta,
                        global_item_counts, select_finetune, train_global)
from .cross_domain import CDCF, CMF, CROSS_DOMAIN, EMCDR, CoNet, NeuMF, NeuMFConfig, select_cross_domain
from .methods import METHODS
from .metrics import DEFAULT_KS, MetricAccumulator, metric_keys, topk_metric_sums
from .protocol import EvalBlock, Method, evaluate, make_block
from .results import build_results, markdown_table, write_results

__all__ = ["CDCF", "CMF", "CROSS_DOMAIN", "CoNet", "EMCDR", "NeuMF", "NeuMFConfig", "select_cross_domain",
           "DEFAULT_KS", "METHODS", "EvalBlock", "Finetune", "FinetuneGrid", "GlobalModel", "GlobalTrainConfig", "ItemPop",
           "Method", "MetricAccumulator", "S2Meta", "build_results", "evaluate", "global_item_counts",
           "make_block", "markdown_table", "metric_keys", "select_finetune", "topk_metric_sums",
           "train_global", "write_results"]
