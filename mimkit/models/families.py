"""Every encoder family's classes by family name: the one place that lists them.

Evaluation asks here for "the classifier of this encoder's family" or "a fresh encoder of this
architecture" instead of naming a concrete class; a new family adds one line to each table.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mimkit.checkpoint import extract_state_dict, load_state_dict_checked
from mimkit.models.classifier import ViTClassifier
from mimkit.models.swin import SwinClassifier, SwinEncoder
from mimkit.models.vit import MaskedViT

ENCODERS: dict[str, type[nn.Module]] = {"vit": MaskedViT, "swin": SwinEncoder}
CLASSIFIERS: dict[str, type[nn.Module]] = {"vit": ViTClassifier, "swin": SwinClassifier}


def classifier_class(family: str) -> type[nn.Module]:
    """The fine-tuning classifier of ``family`` ("vit", "swin", ...)."""
    if family not in CLASSIFIERS:
        raise ValueError(f"no classifier is registered for the {family!r} encoder family")
    return CLASSIFIERS[family]


def fresh_encoder(encoder: nn.Module, **overrides: Any) -> nn.Module:
    """A randomly initialised encoder of ``encoder``'s family and architecture (baselines)."""
    return ENCODERS[encoder.family](**{**encoder.architecture(), **overrides})


def build_classifier_from_checkpoint(obj: dict[str, Any], what: str) -> nn.Module:
    """Rebuild a fine-tuned mimkit classifier (``task: finetune``) of its family and load its weights
    (checkpoints from before families were recorded are ViTs)."""
    config = dict(obj["model_config"])
    cls = classifier_class(config.pop("family", "vit"))
    config.pop("name", None)
    model = cls(**config)
    load_state_dict_checked(model, extract_state_dict(obj), f"Checkpoint {what}")
    return model.eval()
