"""Checkpoint files: atomic writes, safe loads (no code execution), checked weight loading.

A mimkit checkpoint is a plain dict::

    {"format": "mimkit", "version": str, "model": state_dict, "model_config": {"name": ..., **overrides},
     "data_stats": {"mean": [...], "std": [...]}, "epoch": int, "step": int, "config": {...},
     "optimizer": ..., "scaler": ..., "rng": {...}, "summary": {...}}

Rebuilding models and reading other projects' checkpoints (official MAE, timm, DAMA, iBOT/DINO)
is :mod:`mimkit.loading`'s job; this module only moves weights between files and modules.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch
from torch import nn

from mimkit.errors import CheckpointError


class PickledCheckpointError(CheckpointError):
    """A file holding pickled Python objects, which a safe (``weights_only``) load refuses."""


class UnreadableCheckpointError(CheckpointError):
    """A file that is not a readable PyTorch checkpoint; ``reason`` says why in a few words."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# Temporary files of atomic writes are ".<name>.<random>.tmp" beside their target.
_TMP_PREFIX, _TMP_SUFFIX = ".", ".tmp"
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Test hook (tests/test_kill_anywhere.py): MIMKIT_TEST_KILL_IN_SAVE=N SIGKILLs the process in its N-th atomic write.
_KILL_IN_SAVE_ENV = "MIMKIT_TEST_KILL_IN_SAVE"
_atomic_writes = itertools.count(1)


def _test_kill_in_write(f: IO[bytes]) -> None:
    """When MIMKIT_TEST_KILL_IN_SAVE names this write, cut the temporary file in half and SIGKILL ourselves."""
    target = os.environ.get(_KILL_IN_SAVE_ENV)
    if target and next(_atomic_writes) == int(target):
        f.flush()
        f.truncate(f.tell() // 2)
        os.kill(os.getpid(), signal.SIGKILL)


def _disk_nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _write_error(exc: BaseException, path: Path) -> CheckpointError | None:
    """One-sentence error for a failed write the user can fix (disk full, unwritable folder), else None."""
    full = isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS
    # torch.save reports a full disk as a RuntimeError without errno: judge by the free space left.
    full = full or (isinstance(exc, RuntimeError) and _disk_nearly_full(path.parent))
    if full:
        return CheckpointError(f"No disk space left in {path.parent} to write {path.name} (any previous {path.name} "
                               f"is intact): free disk space or choose another output_dir.")
    if isinstance(exc, OSError):
        return CheckpointError(f"Cannot write {path} ({exc.strerror or exc}): choose a writable output_dir.")
    return None


def _write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through ``write(file)`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A run killed mid-write leaves the previous file intact, never a truncated one; a failed write
    (e.g. a full disk) removes its temporary file and raises :class:`CheckpointError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            _test_kill_in_write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        error = _write_error(exc, path)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if error is not None:
            raise error from None
        raise
    return path


def save_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` through :func:`_write_atomic`: a kill or a full disk never leaves a truncated ``path``."""
    return _write_atomic(path, lambda f: torch.save(payload, f))


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Text file (summary.json, config.yaml, log.jsonl rewrites) written like :func:`save_atomic`."""
    return _write_atomic(path, lambda f: f.write(text.encode()))


def remove_stray_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in ``folder``; returns them."""
    stray = [p for p in Path(folder).glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}") if p.is_file()]
    for p in stray:
        p.unlink(missing_ok=True)
    return stray


def _first_sentence(text: str) -> str:
    """torch's reasons run to several sentences; a message quotes only the first (at most 200 characters)."""
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text.strip().splitlines()[0] if text.strip() else "")[0]
    return first.rstrip(".")[:200]


def load_file(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Older pickles (e.g. official MAE training checkpoints holding an argparse Namespace) load
    only with ``allow_pickle=True``, because unpickling can run arbitrary code from the file.
    Raises :class:`PickledCheckpointError` for those and :class:`UnreadableCheckpointError` for
    files that are not PyTorch checkpoints (truncated, corrupt, text).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist: pass the path of a .pt/.pth file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:  # noqa: BLE001 - torch raises many types here
        text = str(exc)
        if not allow_pickle and ("weights_only" in text or "Unsupported global" in text):
            raise PickledCheckpointError(
                f"Checkpoint {path} contains pickled Python objects that a safe load refuses (loading them can "
                f"run code from the file); if you trust its source, retry with --allow-pickle."
            ) from None
        reason = _first_sentence(text) or type(exc).__name__
        raise UnreadableCheckpointError(
            f"Cannot read checkpoint {path} ({reason}): pass a complete PyTorch .pt/.pth file.", reason) from None
    if not isinstance(obj, dict):
        raise UnreadableCheckpointError(f"Checkpoint {path} holds a {type(obj).__name__}, not a dict of weights.",
                                        f"it holds a {type(obj).__name__}, not a dict")
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
            f"{what} does not fit the model: {'; '.join(problems)}; check that the checkpoint was made for this "
            f"architecture (model name, image size, patch size, channels)."
        )
    model.load_state_dict(state, strict=strict)


def encoder_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Only the encoder's own weights, the keys under its family's ``state_prefixes`` (drops an
    MAE's decoder, a classifier's fc_norm/head)."""
    prefixes = tuple(encoder.state_prefixes)
    return {k: v for k, v in encoder.state_dict().items() if k.startswith(prefixes)}
