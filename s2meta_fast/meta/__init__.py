"""Meta-learning layer: update controllers (and, later, the stop controller and the learner)."""
from .update_controller import FastUpdateController, UpdateController

__all__ = ["FastUpdateController", "UpdateController"]
