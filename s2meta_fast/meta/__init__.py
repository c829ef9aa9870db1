"""The meta learner: update and stop controllers, the inner loop and the meta-training loop."""
from .graphs import GraphedInnerLoop
from .learner import AdaptOutput, MetaLearner, MetaLossTerms, Trajectory
from .meta_config import MetaConfig
from .noise import InnerNoise
from .stop_controller import StopController
from .trainer import MetaTrainer, NonFiniteMetaLoss, TrainConfig, WorldSizeMismatch
from .update_controller import FastUpdateController, UpdateController

__all__ = ["AdaptOutput", "FastUpdateController", "GraphedInnerLoop", "InnerNoise", "MetaConfig", "MetaLearner",
           "MetaLossTerms", "MetaTrainer", "NonFiniteMetaLoss", "StopController", "TrainConfig", "Trajectory",
           "UpdateController", "WorldSizeMismatch"]
