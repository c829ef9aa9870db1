"""The methods a run can evaluate, by name: the one registry every choice list comes from.

In results.json's order: s²Meta first, then the baselines in Table 3's order (ItemPop, NeuMF,
CDCF, CMF, EMCDR, CoNet), then the two controls built on s²Meta's own recommender (Global: no
adaptation; Finetune: SGD adaptation).
"""
from __future__ import annotations

from typing import Dict

from .baselines import Finetune, GlobalModel, ItemPop, S2Meta
from .cross_domain import CDCF, CMF, EMCDR, CoNet, NeuMF

METHODS: Dict[str, type] = {cls.name: cls for cls in (S2Meta, ItemPop, NeuMF, CDCF, CMF, EMCDR, CoNet, GlobalModel,
                                                      Finetune)}

# Display names, for tables.
DISPLAY: Dict[str, str] = {"s2meta": "s²Meta", "itempop": "ItemPop", "neumf": "NeuMF", "cdcf": "CDCF", "cmf": "CMF",
                           "emcdr": "EMCDR", "conet": "CoNet", "global": "Global", "finetune": "Finetune"}

__all__ = ["DISPLAY", "METHODS"]
