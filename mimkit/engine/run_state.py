"""What a resume reads and checks: the newest valid checkpoint, the settings it was trained with
and the RNG states.

A run's folder holds ``last.pt`` (every epoch) and ``checkpoint-NNNN.pt`` (every ``save_every``
epochs). The loop writes ``checkpoint-NNNN.pt`` and ``best.pt`` *before* ``last.pt``, so
``last.pt`` commits an epoch: a kill before it repeats the epoch and rewrites the others.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mimkit.checkpoint import PickledCheckpointError, UnreadableCheckpointError, load_file
from mimkit.errors import CheckpointError, ConfigError

RESUMABLE_KEYS = ("model", "optimizer", "scaler", "rng", "epoch", "step")
_PERIODIC = re.compile(r"checkpoint-(\d+)\.pt")

# Settings that cannot change what a run computes: they may differ between a run and its resume.
FREE_SETTINGS = frozenset({
    "output_dir", "train.resume", "train.resume_changed", "train.progress", "train.log_every", "train.device",
    "train.compile", "train.save_every", "data.num_workers", "data.max_bad_fraction", "data.test_split",
    "finetune.eval_batch_size",
    "linprobe.cache_dir",
})
# The config sections each task reads (``model`` is compared as the checkpoint's model_config).
_TASK_SECTIONS = {"pretrain": ("data", "train"), "finetune": ("data", "train", "finetune"),
                  "linprobe": ("data", "train", "linprobe")}
_EVAL_ONLY_DATA = ("data.val_split", "data.labels_per_class", "data.label_fraction", "data.label_seed")


def _numpy_state() -> list:
    """numpy's global RNG state with its key array as a tensor (weights_only loads refuse numpy arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def rng_state() -> dict[str, Any]:
    """torch, Python, numpy (timm's Mixup draws from it) and CUDA generator states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:  # checkpoints before numpy's state was kept
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _read_resumable(path: Path) -> dict[str, Any]:
    """A checkpoint that holds everything a resume needs, else UnreadableCheckpointError."""
    ckpt = load_file(path)
    missing = [k for k in RESUMABLE_KEYS if k not in ckpt]
    if missing:
        raise UnreadableCheckpointError(f"Checkpoint {path} lacks {', '.join(missing)}: it cannot be resumed.",
                                        f"it lacks {', '.join(missing)}")
    return ckpt


def _periodic_checkpoints(out: Path) -> list[Path]:
    """checkpoint-NNNN.pt files, newest epoch first."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*.pt") if (m := _PERIODIC.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_point(out: Path, log: Callable[[str], None]) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint to resume from: last.pt, or the newest valid checkpoint-NNNN.pt when last.pt is
    missing or unreadable (said through ``log``); None when the folder holds neither."""
    last, periodic = out / "last.pt", _periodic_checkpoints(out)
    if not last.is_file() and not periodic:
        return None
    reason = "it is missing"
    if last.is_file():
        try:
            return _read_resumable(last), last
        except PickledCheckpointError:
            raise CheckpointError(
                f"{last} contains pickled Python objects, which mimkit never writes and a safe load refuses (they "
                f"can run code): move the file away or choose another output_dir.") from None
        except UnreadableCheckpointError as exc:
            reason = exc.reason
    for path in periodic:
        try:
            ckpt = _read_resumable(path)
        except CheckpointError:
            continue
        log(f"{last.name} cannot be used ({reason}): resuming from {path.name} (epoch {ckpt['epoch'] + 1}), "
            f"the newest valid checkpoint in {out}.")
        return ckpt, path
    tried = f" and none of {', '.join(p.name for p in periodic)} is valid" if periodic else ""
    raise CheckpointError(f"Cannot resume the run in {out}: {last.name} cannot be used ({reason}){tried}; set "
                          f"train.resume=false to start over, or choose another output_dir.")


def _flat(config: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    flat = {"output_dir": config.get("output_dir")}
    for name in sections:
        flat.update({f"{name}.{k}": v for k, v in (config.get(name) or {}).items()})
    return flat


def changed_settings(saved: dict[str, Any], new: dict[str, Any], task: str) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, new)} for every setting that changes results and differs between two
    ``Config.to_dict()`` dicts; keys only one of them has (other mimkit versions) are skipped."""
    sections = _TASK_SECTIONS.get(task, ("data", "train", "finetune", "linprobe"))
    ignored = FREE_SETTINGS | (set(_EVAL_ONLY_DATA) if task == "pretrain" else set())
    old, cur = _flat(saved, sections), _flat(new, sections)
    return {k: (old[k], cur[k]) for k in sorted(old.keys() & cur.keys()) if k not in ignored and old[k] != cur[k]}


def check_resumable(ckpt: dict[str, Any], path: Path, config: dict[str, Any], model_config: dict[str, Any],
                    task: str, allow_changed: bool) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume into another model, or with other training settings unless ``allow_changed``;
    returns the changed settings (empty for a faithful resume)."""
    out = path.parent
    if ckpt.get("model_config") != model_config:
        raise ConfigError(f"{out} holds a run of another model ({ckpt.get('model_config')}): choose a new output_dir "
                          f"or set train.resume=false to start over.")
    changed = changed_settings(ckpt.get("config") or {}, config, task)
    if changed and not allow_changed:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"{out} holds a run trained with other settings ({listed}): choose a new output_dir, or "
                          f"set train.resume_changed=true to continue it with the new values.")
    return changed
