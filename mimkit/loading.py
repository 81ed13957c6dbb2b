"""Models and encoders out of checkpoint files: mimkit's own, and other projects' layouts.

:func:`detect_format` names the layout of a loaded file; :func:`load_encoder` returns the encoder
of any supported checkpoint (mimkit, official MAE encoder-only / full / visualize / fine-tuned,
timm ViT, original DAMA, iBOT/DINO, official SimMIM Swin pretrained / fine-tuned, timm Swin);
:func:`build_from_checkpoint` rebuilds the whole model a mimkit run trained.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimkit.checkpoint import extract_state_dict, load_file, load_state_dict_checked
from mimkit.errors import CheckpointError
from mimkit.methods.base import select_encoder
from mimkit.methods.dama import dama_original_to_mimkit
from mimkit.models.families import build_classifier_from_checkpoint
from mimkit.models.swin import SwinEncoder
from mimkit.models.vit import MaskedViT
from mimkit.registry import create_model, resolve_model_kwargs

_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-Ti/S/B/L/H
_SWIN_FORMATS = ("simmim-swin", "swin-finetuned", "timm-swin")
# Block keys only a BEiT-style ViT has (the official SimMIM ViT): separate q/v biases, layer scale,
# per-block relative position bias; a shared bias lives in rel_pos_bias.*.
_BEIT_BLOCK_KEYS = (".attn.q_bias", ".gamma_1", ".attn.relative_position_bias_table")
_STAGE_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_ATTN_MASK = re.compile(r"^layers\.(\d+)\.blocks\.\d+\.attn_mask$")


def build_from_checkpoint(path: str | Path, allow_pickle: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a mimkit checkpoint was trained with and load its weights (eval mode)."""
    obj = load_file(path, allow_pickle)
    if obj.get("format") != "mimkit" or "model_config" not in obj:
        raise CheckpointError(
            f"Checkpoint {path} was not written by mimkit (no model_config): import official weights with "
            f"--model NAME so mimkit knows the architecture."
        )
    cfg = dict(obj["model_config"])
    model = create_model(cfg.pop("name"), **cfg)
    load_state_dict_checked(model, extract_state_dict(obj), f"Checkpoint {path}")
    model.eval()
    return model, obj


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _is_swin(state: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in state and any(k.startswith("layers.") for k in state)


def _is_beit_vit(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("rel_pos_bias.") or (k.startswith("blocks.") and k.endswith(_BEIT_BLOCK_KEYS))
               for k in state)


def _swin_or_simmim_format(state: dict[str, torch.Tensor]) -> str | None:
    """The Swin and official SimMIM layouts (see :func:`detect_format`), or None for the others."""
    inner = _strip(state, "encoder.")  # official SimMIM pretraining: encoder.* + decoder.0.* (the 1x1 conv)
    if _is_swin(inner):
        return "simmim-swin"
    if _is_swin(state):
        return "swin-finetuned" if "head.weight" in state else "timm-swin"
    if _is_beit_vit(inner) or _is_beit_vit(state):
        return "simmim-vit"
    return None


def detect_format(obj: dict[str, Any]) -> str:
    """Name the layout of a loaded checkpoint dict.

    mimkit | mimkit-finetuned | dama-original (``base_encoder.*``) | dino-teacher (iBOT/DINO
    ``teacher``/``student`` entries, ``backbone.`` prefix) | simmim-swin (official SimMIM
    pretraining: ``encoder.`` prefix on Swin keys ``layers.*``, ``decoder.0``) | swin-finetuned
    (official SimMIM fine-tuned / original Swin: no prefix, ``head.weight``) | timm-swin (timm Swin
    names, ``head.fc`` or no head) | simmim-vit (official SimMIM's BEiT-style ViT: q/v biases, layer
    scale, relative position bias; detected to be refused) | mae-full (official ``*_full.pth`` and
    ``mae_visualize_*.pth``: encoder + decoder) | mae-finetuned (``fc_norm`` + ``head``, no
    ``norm``) | timm-vit (``norm`` + ``head``) | mae-encoder (official ``mae_pretrain_*.pth``,
    encoder only). DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes are ignored.
    """
    if obj.get("format") == "mimkit" and "model_config" in obj:
        return "mimkit-finetuned" if obj.get("task") == "finetune" else "mimkit"
    if isinstance(obj.get("teacher"), dict) or isinstance(obj.get("student"), dict):
        return "dino-teacher"
    state = extract_state_dict(obj)
    if any(k.startswith(("base_encoder.", "momentum_encoder.")) for k in state):
        return "dama-original"
    if any(k.startswith("backbone.") for k in state):
        return "dino-teacher"
    foreign = _swin_or_simmim_format(state)
    if foreign is not None:
        return foreign
    if "cls_token" not in state or not any(k.startswith("blocks.") for k in state):
        raise CheckpointError(
            "The checkpoint has no ViT weights (cls_token, blocks.*) and no Swin weights (patch_embed, layers.*): "
            "mimkit reads mimkit, official MAE, timm ViT, DAMA, iBOT/DINO, official SimMIM Swin and timm Swin "
            "checkpoints."
        )
    if any(k.startswith("decoder_") for k in state):
        return "mae-full"
    if "head.weight" in state and "norm.weight" not in state and "fc_norm.weight" in state:
        return "mae-finetuned"
    if "head.weight" in state:
        return "timm-vit"
    return "mae-encoder"


def infer_vit_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """MaskedViT arguments read off the tensor shapes of a ViT state dict (timm names)."""
    embed_dim = state["cls_token"].shape[-1]
    proj = state["patch_embed.proj.weight"]  # [D, C, p, p]
    patches = state["pos_embed"].shape[1] - 1
    grid = int(round(patches ** 0.5))
    if grid * grid != patches:
        raise CheckpointError(f"The checkpoint's position table has {patches} patch rows, not a square grid.")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    return dict(
        img_size=grid * proj.shape[-1], patch_size=proj.shape[-1], in_chans=proj.shape[1], embed_dim=embed_dim,
        depth=depth, num_heads=_HEADS_BY_WIDTH.get(embed_dim, max(1, embed_dim // 64)),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        use_mask_token="masked_embed" in state,
    )


def _vit_state_of(obj: dict[str, Any], fmt: str, encoder: str | None, path: Path) -> dict[str, torch.Tensor]:
    """Encoder weights in MaskedViT names for the non-mimkit formats."""
    if fmt == "dama-original":
        converted = dama_original_to_mimkit(extract_state_dict(obj))
        names = sorted({k.split(".", 1)[0] for k in converted if k.startswith("student")})
        name = encoder or "student1"
        if name not in names:
            raise CheckpointError(f"Checkpoint {path} has no encoder {name!r}: choose one of {', '.join(names)}.")
        return _encoder_only(_strip(converted, name + "."))
    if fmt == "dino-teacher":
        name = encoder or ("teacher" if isinstance(obj.get("teacher"), dict) else "student")
        if isinstance(obj.get("teacher"), dict) or isinstance(obj.get("student"), dict):
            if not isinstance(obj.get(name), dict):
                raise CheckpointError(f"Checkpoint {path} has no encoder {name!r}: choose teacher or student.")
            state = extract_state_dict({"model": obj[name]})
        else:
            state = extract_state_dict(obj)
        if any(k.startswith("backbone.") for k in state):
            state = _strip(state, "backbone.")
        return _encoder_only(state)
    _check_single_encoder(encoder, path)
    state = extract_state_dict(obj)
    if fmt == "mae-finetuned":
        # Global-pool fine-tuned MAE has no final norm; its fc_norm normalises the pooled features.
        state = {**state, **{"norm." + k[len("fc_norm."):]: v for k, v in state.items() if k.startswith("fc_norm.")}}
    return _encoder_only(state)


def _check_single_encoder(encoder: str | None, path: Path) -> None:
    if encoder not in (None, "encoder"):
        raise CheckpointError(f"Checkpoint {path} holds one encoder: leave out the encoder name ({encoder!r}).")


def _encoder_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop an MAE decoder and a classifier head; anything else foreign is reported by the strict load."""
    return {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token", "head.", "fc_norm."))}


def _note_guessed_heads(path: Path, width: int, heads: int) -> None:
    """Say that the head count was guessed: the weights cannot tell it, and a wrong one changes every feature."""
    print(f"checkpoint {path}: {heads} attention heads assumed for width {width} (the weights do not record the "
          f"head count); if it was trained with another, pass --model with its preset", flush=True)


# -- Swin ------------------------------------------------------------------------------------------
def _stage_window(state: dict[str, torch.Tensor], stage: int, version: int) -> int | None:
    """Window side of ``stage`` from its first block: V1's bias table [(2w - 1)^2, heads], or (V2, which
    has no such parameter) a saved index [w^2, w^2] / coordinate table [1, 2w - 1, 2w - 1, 2] buffer."""
    attn = f"layers.{stage}.blocks.0.attn."
    if version == 1:
        return (math.isqrt(state[attn + "relative_position_bias_table"].shape[0]) + 1) // 2
    if attn + "relative_position_index" in state:
        return math.isqrt(state[attn + "relative_position_index"].shape[0])
    if attn + "relative_coords_table" in state:
        return (state[attn + "relative_coords_table"].shape[1] + 1) // 2
    return None


def _recorded_img_size(state: dict[str, torch.Tensor], patch: int, windows: list[int | None]) -> int | None:
    """The image side the checkpoint was built for, when its buffers or tables tell it, else None.

    A shifted block's attention mask [nW, w^2, w^2] covers its stage grid with nW windows; a stage
    whose window is smaller than the others' was clamped to its whole grid (grid < window).
    """
    for key, mask in state.items():
        found = _ATTN_MASK.match(key)
        if found and mask.dim() == 3:
            grid = math.isqrt(mask.shape[0]) * math.isqrt(mask.shape[1])
            return grid * patch * 2 ** int(found.group(1))
    known = [w for w in windows if w is not None]
    for stage, w in enumerate(windows):
        if w is not None and w < max(known):
            return w * patch * 2 ** stage
    return None


def infer_swin_config(state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], list[str]]:
    """SwinEncoder arguments read off a Swin state dict (timm or Microsoft names), and the names of
    those the weights do not record and were guessed.

    embed_dim / in_chans / patch_size from ``patch_embed.proj.weight`` [D, C, p, p]; depths by counting
    each stage's blocks; heads per stage from V1's bias tables [(2w - 1)^2, heads] or V2's
    ``logit_scale`` [heads, 1, 1]; the window from the tables (V2: saved buffers); the image size from
    saved attention masks. A guessed image size makes the last stage one window (SimMIM's 192 px at
    window 6, 224 at 7); a guessed V2 window is 8 (timm's swinv2 presets).
    """
    proj = state["patch_embed.proj.weight"]
    blocks: dict[int, set[int]] = {}
    for key in state:
        found = _STAGE_BLOCK.match(key)
        if found:
            blocks.setdefault(int(found.group(1)), set()).add(int(found.group(2)))
    stages = range(len(blocks))
    if sorted(blocks) != list(stages):
        raise CheckpointError(f"The checkpoint's Swin stages {sorted(blocks)} are not numbered 0, 1, 2, ...: it is "
                              f"not a whole Swin encoder.")
    version = 2 if any(k.endswith(".logit_scale") for k in state) else 1
    heads = [state[f"layers.{s}.blocks.0.attn.relative_position_bias_table"].shape[1] if version == 1 else
             state[f"layers.{s}.blocks.0.attn.logit_scale"].shape[0] for s in stages]
    windows = [_stage_window(state, s, version) for s in stages]
    guessed = [] if any(windows) else ["window_size"]
    window = max((w for w in windows if w is not None), default=8)
    img_size = _recorded_img_size(state, proj.shape[-1], windows)
    if img_size is None:
        guessed.append("img_size")
        img_size = window * proj.shape[-1] * 2 ** (len(blocks) - 1)
    kwargs = dict(img_size=img_size, patch_size=proj.shape[-1], in_chans=proj.shape[1], embed_dim=proj.shape[0],
                  depths=[len(blocks[s]) for s in stages], num_heads=heads, window_size=window,
                  mlp_ratio=state["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / proj.shape[0], version=version,
                  use_mask_token="mask_token" in state)
    return kwargs, guessed


def _swin_state_of(obj: dict[str, Any], fmt: str) -> dict[str, torch.Tensor]:
    """Swin encoder weights (timm or Microsoft names): the SimMIM ``encoder.`` part, no classifier head."""
    state = extract_state_dict(obj)
    if fmt == "simmim-swin":
        state = _strip(state, "encoder.")  # drops decoder.* (SimMIM's 1x1 conv + pixel shuffle)
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _swin_kwargs(state: dict[str, torch.Tensor], path: Path, model_name: str | None,
                 overrides: dict[str, Any]) -> dict[str, Any]:
    """SwinEncoder arguments: the preset ``model_name`` (+ overrides), or read off the weights."""
    allowed = inspect.signature(SwinEncoder.__init__).parameters
    if model_name is None:
        try:
            kwargs, guessed = infer_swin_config(state)
        except KeyError as err:
            raise CheckpointError(f"Checkpoint {path} lacks the Swin weight {err.args[0]}: it is not a whole Swin "
                                  f"encoder.") from None
        guessed = [g for g in guessed if g not in overrides]
        if guessed:
            print(f"checkpoint {path}: {', '.join(f'{g} {kwargs[g]}' for g in guessed)} assumed (the weights do "
                  f"not record it); if it was trained with another, pass --model with its preset", flush=True)
        return {**kwargs, **overrides}
    kwargs = resolve_model_kwargs(model_name, **overrides)
    if "depths" not in kwargs:
        raise CheckpointError(f"Checkpoint {path} holds a Swin encoder but --model {model_name} is not a Swin "
                              f"preset: pass a swin_* preset (mimkit models lists them) or leave --model out.")
    return {**{k: v for k, v in kwargs.items() if k in allowed}, "use_mask_token": "mask_token" in state}


def _load_swin(obj: dict[str, Any], fmt: str, path: Path, model_name: str | None, verbose: bool,
               overrides: dict[str, Any]) -> SwinEncoder:
    """A SwinEncoder with the weights of a SimMIM / Swin / timm Swin checkpoint, fitted by its
    ``adapt_state_dict`` (Microsoft layout, stale buffers, bias tables, patch embedding)."""
    state = _swin_state_of(obj, fmt)
    kwargs = _swin_kwargs(state, path, model_name, overrides)
    try:
        swin = SwinEncoder(**kwargs)
    except ValueError as err:
        raise CheckpointError(f"Checkpoint {path} gives a Swin encoder that cannot be built ({err}).") from None
    log = (lambda line: print(f"checkpoint {path}: {line}", flush=True)) if verbose else (lambda _: None)
    load_state_dict_checked(swin, swin.adapt_state_dict(state, log), f"Checkpoint {path} ({fmt})")
    return swin.eval()


def load_encoder(
    path: str | Path, model_name: str | None = None, allow_pickle: bool = False, encoder: str | None = None,
    verbose: bool = False, **overrides: Any,
) -> tuple[nn.Module, dict[str, list[float]] | None]:
    """The encoder (eval mode) of any supported checkpoint, and its data statistics if recorded.

    The format is detected (:func:`detect_format`). mimkit checkpoints rebuild their own model
    and ``encoder`` picks one of its ``eval_encoders()`` (DAMA: student1/student2; iBOT:
    teacher/student). Other files are read into a MaskedViT (Swin layouts: a SwinEncoder) whose
    size is inferred from the tensor shapes, or taken from the preset ``model_name`` when given;
    ``overrides`` replace single arguments. Missing or unexpected keys are reported in one message;
    the official SimMIM ViT is refused (mimkit's ViT is another network).
    """
    path = Path(path)
    obj = load_file(path, allow_pickle)
    fmt = detect_format(obj)
    if verbose:
        print(f"checkpoint {path}: format {fmt}", flush=True)
    if fmt == "mimkit":
        model, _ = build_from_checkpoint(path, allow_pickle)
        return select_encoder(model, encoder).eval(), obj.get("data_stats")
    if fmt == "mimkit-finetuned":
        return build_classifier_from_checkpoint(obj, str(path)).eval(), obj.get("data_stats")
    if fmt == "simmim-vit":
        raise CheckpointError(
            f"Checkpoint {path} is an official SimMIM ViT, a BEiT-style network (relative position bias instead "
            f"of absolute positions, layer scale) that mimkit's ViT does not implement, so its weights would "
            f"compute other features: use the official SimMIM Swin checkpoints, or pretrain SimMIM ViT with mimkit."
        )
    if fmt in _SWIN_FORMATS:
        _check_single_encoder(encoder, path)
        return _load_swin(obj, fmt, path, model_name, verbose, overrides), None
    state = _vit_state_of(obj, fmt, encoder, path)
    if model_name is not None:
        kwargs = resolve_model_kwargs(model_name, **overrides)
        allowed = inspect.signature(MaskedViT.__init__).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in allowed}
        kwargs["use_mask_token"] = "masked_embed" in state
    else:
        kwargs = {**infer_vit_config(state), **overrides}
        if "num_heads" not in overrides:
            _note_guessed_heads(path, kwargs["embed_dim"], kwargs["num_heads"])
    vit = MaskedViT(**kwargs)
    load_state_dict_checked(vit, state, f"Checkpoint {path} ({fmt})")
    return vit.eval(), None
