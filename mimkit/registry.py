"""Named presets: ``create_model(name, **overrides)`` for encoders and methods.

Official MAE names (``mae_vit_base_patch16`` ...) build models whose state dicts equal the
official release. Small-image presets (``*_patch4``) default to 28-px inputs (MedMNIST).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from mimkit.errors import ConfigError
from mimkit.methods.mae import MAE
from mimkit.models.vit import MaskedViT


@dataclass(frozen=True)
class Preset:
    cls: type[nn.Module]
    kwargs: dict[str, Any]
    description: str


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
_OFFICIAL_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_SMALL_DECODER = dict(decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=2)  # 64-d heads, as the encoder

PRESETS: dict[str, Preset] = {}
for _size, _dims in _SIZES.items():
    _patch = 14 if _size == "huge" else 16
    PRESETS[f"vit_{_size}_patch{_patch}"] = Preset(
        MaskedViT, dict(img_size=224, patch_size=_patch, **_dims), f"ViT-{_size[0].upper()}/{_patch} encoder, 224 px"
    )
    PRESETS[f"mae_vit_{_size}_patch{_patch}"] = Preset(
        MAE, dict(img_size=224, patch_size=_patch, **_dims, **_OFFICIAL_DECODER),
        f"MAE ViT-{_size[0].upper()}/{_patch}, decoder 512x8, 224 px",
    )
for _size in ("tiny", "small"):
    PRESETS[f"vit_{_size}_patch4"] = Preset(
        MaskedViT, dict(img_size=28, patch_size=4, **_SIZES[_size]), f"ViT-{_size[0].upper()}/4 encoder, 28 px"
    )
    PRESETS[f"mae_vit_{_size}_patch4"] = Preset(
        MAE, dict(img_size=28, patch_size=4, **_SIZES[_size], **_SMALL_DECODER),
        f"MAE ViT-{_size[0].upper()}/4, decoder 128x4, 28 px (MedMNIST)",
    )


def model_arguments(name: str) -> dict[str, inspect.Parameter]:
    """Constructor parameters that ``create_model(name, ...)`` accepts as overrides."""
    preset = get_preset(name)
    params = inspect.signature(preset.cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self"}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else f" Known: {', '.join(sorted(PRESETS))}."
        raise ConfigError(f"Unknown model {name!r}.{hint}")
    return PRESETS[name]


def resolve_model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Preset defaults merged with overrides, after checking every override is a real argument."""
    allowed = model_arguments(name)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ConfigError(
            f"Model {name!r} has no argument {', '.join(unknown)}; valid arguments: {', '.join(allowed)}."
        )
    kwargs = {k: p.default for k, p in allowed.items() if p.default is not inspect.Parameter.empty}
    kwargs.update(get_preset(name).kwargs)
    kwargs.update(overrides)
    return kwargs


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a preset by name, e.g. ``create_model("mae_vit_base_patch16", norm_pix_loss=True)``."""
    kwargs = resolve_model_kwargs(name, **overrides)
    return get_preset(name).cls(**kwargs)


def list_models() -> list[str]:
    return sorted(PRESETS)
