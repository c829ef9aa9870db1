"""Fake (meta) implementations and autograd formulas for every op in torch.ops.s2meta.

One module per op family; importing this package registers them all.
"""
from . import grad_preprocess, lstm_update, hinge_score, score_matrix  # noqa: F401
