"""A run's records: ``log.jsonl`` (always) and TensorBoard (when installed), main process only.

A resumed run replays the steps after its checkpoint, so the records those steps wrote before
the kill are dropped first: log.jsonl keeps the epochs the checkpoint covers, and TensorBoard
purges the events after the checkpoint's step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mimkit.checkpoint import write_text_atomic


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every complete JSON line; a line cut by a kill is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out


def keep_records_through(path: Path, last_epoch: int) -> None:
    """Rewrite log.jsonl with only the records of epochs <= ``last_epoch`` (-1: none, a fresh run)."""
    if not path.is_file():
        return
    kept = [line for line, r in _records(path) if isinstance(r.get("epoch"), int) and r["epoch"] <= last_epoch]
    if not kept:
        path.unlink()
    else:
        write_text_atomic("".join(line + "\n" for line in kept), path)


class RunLog:
    """Appends records to log.jsonl and TensorBoard; ``resume_at`` = (epoch, step) of the checkpoint
    the run continues from, or None for a fresh run (which drops any earlier records)."""

    def __init__(self, out: Path, enabled: bool, resume_at: tuple[int, int] | None):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        last_epoch, last_step = resume_at if resume_at is not None else (-1, -1)
        keep_records_through(self.path, last_epoch)
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency
        except ImportError:
            return
        # Events at steps >= purge_step from an earlier session are hidden by TensorBoard.
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=last_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar, or None when disabled (non-main processes, train.progress=false)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
