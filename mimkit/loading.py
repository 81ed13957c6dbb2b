"""Models and encoders out of checkpoint files: mimkit's own, and other projects' layouts.

:func:`detect_format` names the layout of a loaded file; :func:`load_encoder` returns the encoder
of any supported checkpoint (mimkit, official MAE encoder-only / full / visualize / fine-tuned,
timm ViT, original DAMA, iBOT/DINO); :func:`build_from_checkpoint` rebuilds the whole model a
mimkit run trained.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimkit.checkpoint import extract_state_dict, load_file, load_state_dict_checked
from mimkit.errors import CheckpointError
from mimkit.methods.base import select_encoder
from mimkit.methods.dama import dama_original_to_mimkit
from mimkit.models.families import build_classifier_from_checkpoint
from mimkit.models.vit import MaskedViT
from mimkit.registry import create_model, resolve_model_kwargs

_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-Ti/S/B/L/H


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


def detect_format(obj: dict[str, Any]) -> str:
    """Name the layout of a loaded checkpoint dict.

    mimkit | mimkit-finetuned | dama-original (``base_encoder.*``) | dino-teacher (iBOT/DINO
    ``teacher``/``student`` entries, ``backbone.`` prefix) | mae-full (official ``*_full.pth`` and
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
    if "cls_token" not in state or not any(k.startswith("blocks.") for k in state):
        raise CheckpointError(
            "The checkpoint has no ViT weights (cls_token, blocks.*): mimkit reads mimkit, official MAE, "
            "timm ViT, DAMA and iBOT/DINO checkpoints."
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
    if encoder not in (None, "encoder"):
        raise CheckpointError(f"Checkpoint {path} holds one encoder: leave out the encoder name ({encoder!r}).")
    state = extract_state_dict(obj)
    if fmt == "mae-finetuned":
        # Global-pool fine-tuned MAE has no final norm; its fc_norm normalises the pooled features.
        state = {**state, **{"norm." + k[len("fc_norm."):]: v for k, v in state.items() if k.startswith("fc_norm.")}}
    return _encoder_only(state)


def _encoder_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop an MAE decoder and a classifier head; anything else foreign is reported by the strict load."""
    return {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token", "head.", "fc_norm."))}


def _note_guessed_heads(path: Path, width: int, heads: int) -> None:
    """Say that the head count was guessed: the weights cannot tell it, and a wrong one changes every feature."""
    print(f"checkpoint {path}: {heads} attention heads assumed for width {width} (the weights do not record the "
          f"head count); if it was trained with another, pass --model with its preset", flush=True)


def load_encoder(
    path: str | Path, model_name: str | None = None, allow_pickle: bool = False, encoder: str | None = None,
    verbose: bool = False, **overrides: Any,
) -> tuple[nn.Module, dict[str, list[float]] | None]:
    """The encoder (a MaskedViT, eval mode) of any supported checkpoint, and its data statistics if recorded.

    The format is detected (:func:`detect_format`). mimkit checkpoints rebuild their own model
    and ``encoder`` picks one of its ``eval_encoders()`` (DAMA: student1/student2; iBOT:
    teacher/student). Other files are read into a MaskedViT whose size is inferred from the
    tensor shapes, or taken from the preset ``model_name`` when given. Missing or unexpected
    keys are reported in one message.
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
