"""Encoders and the named model presets (timm-style registry by name)."""

from mimkit.models.patches import patchify, unpatchify
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import EncoderOutput, MaskedViT

__all__ = ["MaskedViT", "EncoderOutput", "patchify", "unpatchify", "sincos_2d"]
