"""The meta learner: update and stop controllers, the inner loop and the meta-training loop."""
from .learner import AdaptOutput, MetaLearner, MetaLossTerms, Trajectory
from .meta_config import MetaConfig
from .noise import InnerNoise
from .stop_controller import StopController
from .update_controller import FastUpdateController, UpdateController

__all__ = ["AdaptOutput", "FastUpdateController", "InnerNoise", "MetaConfig", "MetaLearner", "MetaLossTerms",
           "StopController", "Trajectory", "UpdateController"]
