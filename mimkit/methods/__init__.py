"""Pretraining methods, one file each; see :mod:`mimkit.methods.base` for the interface."""

from mimkit.methods.base import StepOutput
from mimkit.methods.mae import MAE

__all__ = ["MAE", "StepOutput"]
