"""Encoders and the named model presets (timm-style registry by name)."""

from mimkit.models.patches import patchify, unpatchify
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import EncoderOutput, MaskedViT, pool_features

__all__ = ["MaskedViT", "EncoderOutput", "pool_features", "patchify", "unpatchify", "sincos_2d"]
