"""Named presets: ``create_model(name, **overrides)`` for encoders and methods.

Official MAE names (``mae_vit_base_patch16`` ...) build models whose state dicts equal the
official release. Small-image presets (``*_patch4``) default to 28-px inputs (MedMNIST).
"""

from __future__ import annotations

import difflib
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


# --- DAMA presets (mimkit/methods/dama.py) ---
from mimkit.methods.dama import DAMA  # noqa: E402

# The DAMA recipe (mask 0.8, overlap 0.5, last 6 blocks, norm-pix) is the class default.
for _size in ("tiny", "small", "base"):
    PRESETS[f"dama_vit_{_size}_patch16"] = Preset(
        DAMA, dict(img_size=224, patch_size=16, **_SIZES[_size], **_OFFICIAL_DECODER),
        f"DAMA, two ViT-{_size[0].upper()}/16 MAE students, decoder 512x8, 224 px",
    )
PRESETS["dama_vit_tiny_patch4"] = Preset(
    DAMA, dict(img_size=28, patch_size=4, **_SIZES["tiny"], **_SMALL_DECODER),
    "DAMA, two ViT-T/4 MAE students, decoder 128x4, 28 px (MedMNIST)",
)

# --- iBOT presets (mimkit/methods/ibot.py) ---
from mimkit.methods.ibot import IBOT  # noqa: E402

# The seed's recipe (methods.md §5.5): 2 global 224-px + 6 local 96-px crops, 8192-d shared head,
# momentum 0.99 -> 1 over 100 epochs; the class defaults hold the rest.
_IBOT_RECIPE = dict(img_size=224, patch_size=16, local_crop_size=96, num_local_crops=6, total_epochs=100)
PRESETS["ibot_vit_small_patch16"] = Preset(
    IBOT, dict(**_IBOT_RECIPE, **_SIZES["small"]), "iBOT ViT-S/16, block masks, 2x224 + 6x96 crops (seed recipe)"
)
PRESETS["ibot_multimask_vit_small_patch16"] = Preset(
    IBOT, dict(**_IBOT_RECIPE, **_SIZES["small"], mask_strategy="attmask_high", mask_scores="raw", mask_layers=[11, 4]),
    "iBOT ViT-S/16, AttMask-high from teacher blocks 11 / 4 per crop (the seed's multi-layer masks)",
)
PRESETS["ibot_vit_base_patch16"] = Preset(
    IBOT, dict(**_IBOT_RECIPE, **_SIZES["base"]), "iBOT ViT-B/16, block masks, 2x224 + 6x96 crops"
)
# 28-px images: 7x7 global grid, 4 local 12-px crops (3x3), small head so a step stays cheap on a CPU.
PRESETS["ibot_vit_tiny_patch4"] = Preset(
    IBOT, dict(img_size=28, patch_size=4, **_SIZES["tiny"], local_crop_size=12, num_local_crops=4, out_dim=2048,
               patch_out_dim=2048, head_hidden_dim=512, head_bottleneck_dim=128, global_crop_scale=[0.4, 1.0],
               local_crop_scale=[0.1, 0.4]),
    "iBOT ViT-T/4, 2x28 + 4x12-px crops, 2048-d head, 28 px (MedMNIST)",
)

# --- Swin encoders (mimkit/models/swin.py; values and sources there) ---
from mimkit.models.swin import PRESET_ARGS as _SWIN_PRESETS, SwinEncoder  # noqa: E402

for _name, (_kwargs, _description) in _SWIN_PRESETS.items():
    PRESETS[_name] = Preset(SwinEncoder, _kwargs, _description)

# --- SimMIM presets (mimkit/methods/simmim.py; values and sources there) ---
from mimkit.methods.simmim import PRESET_ARGS as _SIMMIM_PRESETS  # noqa: E402

for _name, (_cls, _kwargs, _description) in _SIMMIM_PRESETS.items():
    PRESETS[_name] = Preset(_cls, _kwargs, _description)

# --- DDMIM presets (mimkit/methods/ddmim.py; values and sources there) ---
from mimkit.methods.ddmim import PRESET_ARGS as _DDMIM_PRESETS  # noqa: E402

for _name, (_cls, _kwargs, _description) in _DDMIM_PRESETS.items():
    PRESETS[_name] = Preset(_cls, _kwargs, _description)


def model_arguments(name: str) -> dict[str, inspect.Parameter]:
    """Constructor parameters that ``create_model(name, ...)`` accepts as overrides."""
    preset = get_preset(name)
    params = inspect.signature(preset.cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self"}


def _docstring_args(doc: str) -> dict[str, str]:
    """``{argument: meaning}`` from the ``Args:`` section of a Google-style docstring.

    An entry ``a, b: text`` (its text may continue on deeper-indented lines, and a long list of
    names may wrap before the colon) gives the same meaning to each name.
    """
    entries: list[str] = []
    indent = None
    inside = False
    for line in inspect.cleandoc(doc).splitlines():
        stripped = line.strip()
        if not line.startswith(" ") and stripped.startswith("Args") and stripped.endswith(":"):
            inside, indent = True, None
            continue
        if not inside or not stripped:
            inside = inside and bool(stripped)  # a blank line ends the section
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            inside = False
        elif depth == indent and (not entries or ":" in entries[-1]):
            entries.append(stripped)
        else:  # continuation of the text, or of a names list wrapped before its colon
            entries[-1] += " " + stripped
    meanings = {}
    for entry in entries:
        names, _, text = entry.partition(": ")
        parts = [n.strip() for n in names.split(",") if n.strip()]
        if text and all(part.isidentifier() for part in parts):
            meanings.update({part: text for part in parts})
    return meanings


def argument_help(name: str) -> dict[str, str]:
    """The documented meaning of each constructor argument of preset ``name`` (its classes' docstrings)."""
    meanings: dict[str, str] = {}
    for cls in reversed(get_preset(name).cls.__mro__):  # a subclass's own words win
        meanings.update(_docstring_args(cls.__doc__ or ""))
    return meanings


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        if close:
            raise ConfigError(f"Unknown model {name!r}: Did you mean {', '.join(close)} (mimkit models lists all presets)?")
        raise ConfigError(f"Unknown model {name!r}: choose one of {', '.join(sorted(PRESETS))} (mimkit models describes them).")
    return PRESETS[name]


def resolve_model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Preset defaults merged with overrides, after checking every override is a real argument."""
    allowed = model_arguments(name)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ConfigError(
            f"Model {name!r} has no argument {', '.join(unknown)}: use one of {', '.join(allowed)} "
            f"(mimkit config show model --model {name} describes them)."
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
