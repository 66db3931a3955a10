"""Model registry; importing the package registers every built-in model."""

from crackray.models import classifiers, segdec  # noqa: F401  (registration side effect)
from crackray.models.finetune import split_parameters, train_mode
from crackray.models.registry import create_model, list_models, model_segments, register_model

__all__ = [
    "create_model",
    "list_models",
    "model_segments",
    "register_model",
    "split_parameters",
    "train_mode",
]
