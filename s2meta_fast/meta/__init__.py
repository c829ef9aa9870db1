"""The meta learner: update and stop controllers, the inner loop and the meta-training loop."""
from .update_controller import FastUpdateController, UpdateController

__all__ = ["FastUpdateController", "UpdateController"]
