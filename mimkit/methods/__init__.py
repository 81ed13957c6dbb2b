"""Pretraining methods, one file each; see :mod:`mimkit.methods.base` for the interface."""

from mimkit.methods.base import StepOutput
from mimkit.methods.dama import DAMA
from mimkit.methods.ibot import IBOT
from mimkit.methods.mae import MAE

__all__ = ["DAMA", "IBOT", "MAE", "StepOutput"]
