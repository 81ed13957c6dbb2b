"""Checkpoint files: atomic writes, safe loads (no code execution), checked weight loading.

A mimkit checkpoint is a plain dict::

    {"format": "mimkit", "version": str, "model": state_dict, "model_config": {"name": ..., **overrides},
     "data_stats": {"mean": [...], "std": [...]}, "epoch": int, "step": int, "config": {...},
     "optimizer": ..., "scaler": ..., "rng": {...}}

Rebuilding models and reading other projects' checkpoints (official MAE, timm, DAMA, iBOT/DINO)
is :mod:`mimkit.loading`'s job; this module only moves weights between files and modules.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimkit.errors import CheckpointError


def save_atomic(payload: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A run killed mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_file(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Older pickles (e.g. official MAE training checkpoints holding an argparse Namespace) load
    only with ``allow_pickle=True``, because unpickling can run arbitrary code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist: pass the path of a .pt/.pth file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:  # noqa: BLE001 - torch raises many types here
        text = str(exc)
        if not allow_pickle and ("weights_only" in text or "Unsupported global" in text):
            raise CheckpointError(
                f"Checkpoint {path} contains pickled Python objects that a safe load refuses (loading them can "
                f"run code from the file); if you trust its source, retry with --allow-pickle."
            ) from None
        raise CheckpointError(f"Cannot read checkpoint {path} ({text.splitlines()[0][:200]}): is it a PyTorch file?") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"Checkpoint {path} holds a {type(obj).__name__}, not a dict of weights.")
    return obj


def extract_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint dict: mimkit/official ``model`` entry, ``state_dict``, or bare."""
    for key in ("model", "state_dict", "module"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError("The checkpoint holds no tensors: it is not a model checkpoint.")
    # DDP / torch.compile wrappers add prefixes that the bare model does not have.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], what: str, strict: bool = True) -> None:
    """load_state_dict with one readable message for missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if wrong_shape:
        problems.append(f"shape mismatch for {', '.join(wrong_shape[:3])}" + (" ..." if len(wrong_shape) > 3 else ""))
    if strict and missing:
        problems.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
    if problems:
        raise CheckpointError(
            f"{what} does not fit the model: {'; '.join(problems)}. Check that the checkpoint was made for this "
            f"architecture (model name, image size, patch size, channels)."
        )
    model.load_state_dict(state, strict=strict)


_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "masked_embed")


def encoder_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Only the encoder's own weights (drops an MAE's decoder, a classifier's fc_norm/head)."""
    return {k: v for k, v in encoder.state_dict().items() if k.startswith(_ENCODER_PREFIXES)}
