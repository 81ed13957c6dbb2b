"""Kill anywhere: SIGKILL tiny ``mimkit pretrain``, ``finetune`` and ``linprobe`` runs at seeded random
moments, rerun the same command until it completes, and demand the uninterrupted run's result.

Kill moments alternate between

* a timer: a delay drawn uniformly over the training time this process has left (measured on the
  uninterrupted run, from its banner line to its exit), so a kill lands anywhere in an epoch, in
  evaluation, in a checkpoint write or in the final summary;
* a write: ``MIMKIT_TEST_KILL_IN_SAVE=N`` makes the process SIGKILL itself halfway through its N-th
  atomic write (config.yaml, checkpoint-NNNN.pt, best.pt, last.pt, a log rewrite, summary.json).

Each command's kills form one chain in one folder (a killed run resumes a resumed run), so the
number of processes stays kills + 2. The chain must end bit-identical to the uninterrupted run:
every checkpoint's weights, step and optimizer state, the log records (no replayed step twice),
the TensorBoard steps and the metrics, with no stray, missing or corrupt file.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimkit.checkpoint import load_file
from tests.conftest import REPO, TINY_MAE

KILL_ENV = "MIMKIT_TEST_KILL_IN_SAVE"
ENV = {k: v for k, v in os.environ.items() if k != KILL_ENV} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
# A MAE 32 wide on 8x8 images (four 4x4 patches): an epoch of 12 steps takes a fraction of a second.
TINY = [*TINY_MAE, "model.img_size=8", "model.embed_dim=32", "model.num_heads=2", "model.decoder_embed_dim=32",
        "model.decoder_num_heads=2"]
RUN = ["train.progress=false", "train.save_every=1", "train.log_every=4", "train.warmup_epochs=1"]


@dataclass
class Command:
    """One CLI command whose runs are killed; ``argv(out)`` runs it into folder ``out``."""

    task: str
    args: list[str]
    epochs: int
    kills: int
    name: str = ""  # folder and report name; default the task

    @property
    def label(self) -> str:
        return self.name or self.task

    def argv(self, out: Path) -> list[str]:
        return [sys.executable, "-m", "mimkit", self.task, *self.args, f"train.epochs={self.epochs}", *RUN,
                f"output_dir={out}"]


def _start(cmd: Command, out: Path, kill_in_write: int | None = None) -> subprocess.Popen:
    env = ENV | ({KILL_ENV: str(kill_in_write)} if kill_in_write else {})
    return subprocess.Popen(cmd.argv(out), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_banner(proc: subprocess.Popen, task: str) -> list[str]:
    """Lines up to the one that starts training (or says the run is finished), or to the end."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"mimkit {task}:") or "holds a finished run" in line:
            break
    return lines


def _finish(proc: subprocess.Popen, lines: list[str], killed: bool) -> bool:
    """Reap the process; True if it died of SIGKILL, else it must have succeeded."""
    lines += proc.stdout.read().splitlines(keepends=True)
    proc.wait()
    proc.stdout.close()
    if proc.returncode == -9 and killed:
        return True
    assert proc.returncode == 0, "".join(lines[-30:])
    return False


def _kill_after(cmd: Command, out: Path, delay: float) -> bool:
    """Start the command; SIGKILL it ``delay`` seconds after its banner. True if the kill landed."""
    proc = _start(cmd, out)
    lines = _wait_for_banner(proc, cmd.task)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
    return _finish(proc, lines, killed=True)


def _kill_in_write(cmd: Command, out: Path, n: int) -> bool:
    """Run the command with its n-th atomic write killed halfway. True if it died there."""
    proc = _start(cmd, out, kill_in_write=n)
    return _finish(proc, [], killed=True)


def _epochs_done(out: Path) -> int:
    return load_file(out / "last.pt")["epoch"] + 1 if (out / "last.pt").is_file() else 0


def uninterrupted(cmd: Command, out: Path) -> float:
    """Run the command straight through; returns its training time (banner to exit, seconds)."""
    proc = _start(cmd, out)
    lines = _wait_for_banner(proc, cmd.task)
    start = time.monotonic()
    _finish(proc, lines, killed=False)
    return time.monotonic() - start


def killed_chain(cmd: Command, out: Path, kills: int, train_time: float, rng: random.Random) -> list[str]:
    """Kill the command up to ``kills`` times in one folder, then rerun it to completion.

    Returns the kills that landed, e.g. "timer 0.41s after the banner (2 epochs done)". The chain
    ends early when a run completes before its kill, or when all epochs are done.
    """
    landed = []
    while len(landed) < kills and (done := _epochs_done(out)) < cmd.epochs:
        left = cmd.epochs - done
        if len(landed) % 2 == 0:
            delay = rng.uniform(0.0, train_time * left / cmd.epochs)
            kill, what = _kill_after(cmd, out, delay), f"timer {delay:.2f}s after the banner"
        else:
            n = rng.randint(1, 1 + 2 * left)  # config.yaml, then at least checkpoint + last.pt per epoch
            kill, what = _kill_in_write(cmd, out, n), f"in atomic write {n}"
        if not kill:
            return landed
        landed.append(f"{what} ({done} epochs done)")
    _finish(_start(cmd, out), [], killed=False)
    return landed


def killed_chains(cmd: Command, root: Path, train_time: float, rng: random.Random) -> list[tuple[Path, list[str]]]:
    """Chains in folders root/0, root/1, ... until ``cmd.kills`` kills have landed.

    A new chain starts when a timer fired after the last epoch (during the final scoring), which
    ends a chain; at most ``cmd.kills + 2`` chains, so the process count stays bounded.
    """
    chains, total = [], 0
    while total < cmd.kills and len(chains) < cmd.kills + 2:
        out = root / str(len(chains))
        chains.append((out, killed_chain(cmd, out, cmd.kills - total, train_time, rng)))
        total += len(chains[-1][1])
    return chains


# -- comparing a chain with the uninterrupted run ---------------------------------------------------
def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "tensorboard" not in p.parts)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _records(out: Path) -> list[tuple]:
    """Every log.jsonl line (each must parse) as (kind, epoch, step, loss)."""
    return [(r["kind"], r["epoch"], r["step"], r["loss"]) for r in map(json.loads, open(out / "log.jsonl"))]


def _tensorboard_steps(out: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def assert_same_run(ref: Path, out: Path) -> None:
    assert _files(out) == _files(ref)  # nothing stray (no .tmp), nothing missing
    for name in (n for n in _files(ref) if n.endswith(".pt")):
        a, b = load_file(ref / name), load_file(out / name)
        assert _same(a["model"], b["model"]), name
        assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]), name
        if "optimizer" in a:
            sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
            assert sa.keys() == sb.keys() and all(_same(sa[i], sb[i]) for i in sa), name
    for name in (n for n in _files(ref) if n.endswith(".json")):
        a, b = json.loads((ref / name).read_text()), json.loads((out / name).read_text())
        assert a.get("metrics") == b.get("metrics") and a.get("final_loss") == b.get("final_loss"), name
    assert _records(out) == _records(ref)
    assert _tensorboard_steps(out) == _tensorboard_steps(ref)


# -- the test ------------------------------------------------------------------------------------
def _tiny_npz(path: Path) -> Path:
    """192 / 64 / 64 grey 8x8 images in 4 classes (train / val / test), seeded."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 320)
    images = (rng.integers(0, 120, (320, 8, 8)) + 30 * labels[:, None, None]).astype(np.uint8)
    splits = {"train": slice(0, 192), "val": slice(192, 256), "test": slice(256, 320)}
    np.savez(path, **{f"{s}_images": images[i] for s, i in splits.items()},
             **{f"{s}_labels": labels[i, None] for s, i in splits.items()})
    return path


def _jpeg_folder(root: Path) -> Path:
    """192 grey/RGB/CMYK 8x8..12x12 JPEGs in 2 classes, plus one truncated file."""
    rng = np.random.default_rng(1)
    modes = ("RGB", "L", "CMYK")
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(96):
            side = 8 + i % 5
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).convert(modes[i % 3]).save(
                root / c / f"{i:02d}.jpg")
    (root / "a" / "zz.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def _chains_of(cmd: Command, train_time: float | None, seed: int, tmp: Path):
    """(command, reference folder, [(chain folder, kills)]), measuring the reference when needed."""
    ref = tmp / f"{cmd.label}_ref"
    if train_time is None:
        train_time = uninterrupted(cmd, ref)
    return cmd, ref, killed_chains(cmd, tmp / f"{cmd.label}_killed", train_time, random.Random(seed))


def test_runs_killed_anywhere_resume_to_the_uninterrupted_result(tmp_path):
    data = _tiny_npz(tmp_path / "tiny.npz")
    pre = Command("pretrain", [*TINY, f"data.path={data}", "train.batch_size=16"], epochs=6, kills=12)
    start = time.monotonic()
    pre_time = uninterrupted(pre, tmp_path / "pretrain_ref")
    source = f"--checkpoint={tmp_path / 'pretrain_ref' / 'last.pt'}"
    fine = Command("finetune", [source, f"--data={data}", "train.batch_size=16"], epochs=4, kills=4)
    probe = Command("linprobe", [source, f"--data={data}", "train.batch_size=32"], epochs=6, kills=4)
    # A lazily decoded JPEG folder (2 persistent workers, one unreadable file skipped each epoch).
    lazy = Command("pretrain", [*TINY, f"data.path={_jpeg_folder(tmp_path / 'jpegs')}", "data.in_memory=false",
                                "data.num_workers=2", "data.max_bad_fraction=0.01", "train.batch_size=8"],
                   epochs=6, kills=4, name="pretrain_lazy")
    # Four commands side by side: each thread mostly waits on its subprocess (two cores).
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: _chains_of(*job, tmp_path),
                                [(pre, pre_time, 0), (fine, None, 1), (probe, None, 2), (lazy, None, 3)]))
    elapsed = time.monotonic() - start
    report = []
    for cmd, ref, chains in results:
        landed = [kill for _, kills in chains for kill in kills]
        assert len(landed) >= cmd.kills, f"{cmd.label}: only {landed} landed"
        for out, _ in chains:
            assert_same_run(ref, out)
        report.append(f"{cmd.label} ({len(chains)} chain(s)): {', '.join(landed)}")
    print(f"kill anywhere: {sum(c.kills for c in (pre, fine, probe, lazy))}+ kills in {elapsed:.0f}s; " + "; ".join(report))
