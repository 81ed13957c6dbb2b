"""Pretraining on a 200 k-file image folder: time to start, flat RSS, unreadable files, exact resume after kill -9.

    python benchmarks/data_scale.py --out benchmarks/results/data_scale_cpu.json

(defaults: ``--folder runs/bench_200k --images 200000 --classes 1000 --corrupt 50``, 2 epochs of a
2-block MAE ViT-T/4 at 32 px, batch 256, 2 DataLoader workers, on the CPU; about 35 minutes on 2
otherwise idle cores at ~500 images/s: generation ~1 min, run A 2 epochs of ~400 s, run B 1.5,
B resumed 1). It checks, with the ``mimkit pretrain`` command a user runs:

1. generation (once; ``<folder>/dataset.json`` records the parameters, and a folder that already
   holds them is reused): ``--images`` small JPEGs (40-64 px, a seeded colour gradient plus noise)
   in ``--classes`` ImageFolder class folders, 1 % greyscale and 1 % CMYK JPEGs, 0.1 % palette
   and 0.1 % RGBA PNGs, plus ``--corrupt`` broken files with .jpg names (a bare JPEG header, a
   JPEG cut in half, random bytes, an empty file), made by 2 processes; timed on its own;
2. indexing: :func:`mimkit.data.folder_index.index_folder` with an empty cache (the scan), then
   again (the cache hit). The directory entries are in the OS page cache either way (dropping
   it needs root), so "cold" is the scan of a warm disk;
3. run A, ``mimkit pretrain`` in a subprocess (``data.in_memory=false``, ``MIMKIT_DATA`` inside
   the benchmark folder, its index cache emptied first, so A starts as a first run on a new
   folder does): seconds from process start to the ``mimkit pretrain:`` banner (printed just
   before the first step) and to the first ``train`` record of log.jsonl; the memory of the
   process tree as a series of rows of ``--interval`` s (jittered, so rows do not lock onto the
   step period): images seen so far (from log.jsonl), the main process's lowest and highest
   VmRSS in the row (read every 0.05 s: a step's transient buffers come and go by hundreds of
   MiB, the floor between them is what the process keeps), the sum of the workers' VmRSS, and
   every ``--pss-interval`` s the PSS of the main process and of the workers (a forked worker's
   VmRSS cannot show copy-on-write, the pages it copies were already counted as resident; PSS
   can). Least-squares fits against images seen over the first ``--rss-warmup`` of epoch 1
   (workers starting; a random order touches every page of what the workers read within a few
   percent of an epoch, so copy-on-write shows there), the rest of epoch 1 and epoch 2 give MiB
   per 100 k images with a standard error: flat means under 2 by two standard errors, grows
   means over 2 by two. Images/s per epoch;
4. unreadable files: summary.json's count against the planted number. An epoch visits
   ``len // batch * batch`` samples (drop_last), so a planted file can go unvisited in one epoch;
   the script replays the run's seeded sampler and the skip rule (the next file at a fixed
   stride) to give the exact count to expect per epoch;
5. ``--resume-check`` (on by default): run B, the same command in another output_dir, gets
   SIGKILL in the middle of epoch 2 (at its first log record past ``--kill-at`` of the epoch),
   its orphaned DataLoader workers are waited for (and killed if they linger), then B is rerun
   in its output_dir to the end and every tensor of ``last.pt["model"]`` is compared with A's
   (``torch.equal``).

Prints one JSON object on stdout (also written to ``--out``), its ``acceptance`` entry first (the
four claims as measured); progress and the runs' own lines go to stderr; each run's full output is
kept in ``<folder>/runs/<run>.out``. Smoke test (about 1 min on idle cores; its memory verdicts
mean little, the windows are too short):

    python benchmarks/data_scale.py --folder /tmp/ds_smoke --images 3000 --classes 30 --corrupt 2 \\
        --batch-size 64 --log-every 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np

GENERATOR_VERSION = 1  # bump when the files made for given parameters change
BANNER = "mimkit pretrain:"
FLAT_MIB_PER_100K = 2.0  # below this slope RSS counts as flat (ImageNet: < 26 MiB over a 1.28 M-image epoch)
MIB = 1024 * 1024
FAST_READ_S = 0.05  # VmRSS reads within one sample row (20 us each)


def say(text: str) -> None:
    print(f"data_scale: {text}", file=sys.stderr, flush=True)


class UsageError(Exception):
    """A mistake on the command line: one sentence, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as mimkit's own CLI does
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help.\n")


# -- 1. the synthetic folder ------------------------------------------------------------------------

def file_kind(i: int, images: int) -> str:
    """What file ``i`` is: a pure function of its number, so any process can make any file."""
    if i >= images:
        return "corrupt"
    if i % 100 == 7:
        return "grey"
    if i % 100 == 23:
        return "cmyk"
    if i % 1000 == 311:
        return "palette"
    return "rgba" if i % 1000 == 611 else "rgb"


def file_path(root: Path, i: int, p) -> Path:
    """Good files go round-robin over the classes; the corrupt ones are spread evenly over them."""
    if i >= p["images"]:
        c = (i - p["images"]) * p["classes"] // max(1, p["corrupt"])
    else:
        c = i % p["classes"]
    suffix = ".png" if file_kind(i, p["images"]) in ("palette", "rgba") else ".jpg"
    return root / f"n{c:05d}" / f"{i:07d}{suffix}"


def _pixels(rng: np.random.Generator) -> np.ndarray:
    """A colour gradient plus noise: cheap, but not constant, and JPEG-compressible like a photo."""
    h, w = (int(v) for v in rng.integers(40, 65, 2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / 64
    base, dx, dy = rng.uniform(60, 196, 3), rng.uniform(-80, 80, 3), rng.uniform(-80, 80, 3)
    image = base + x[..., None] * dx + y[..., None] * dy + rng.normal(0, 12, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _corrupt_bytes(k: int, rng: np.random.Generator) -> bytes:
    """The ways files break in real collections: cut during a copy, overwritten, never written."""
    import io

    from PIL import Image

    if k % 4 == 0:
        return b"\xff\xd8\xff\xe0 truncated JPEG"
    if k % 4 == 1:
        buffer = io.BytesIO()
        Image.fromarray(_pixels(rng)).save(buffer, "JPEG", quality=90)
        return buffer.getvalue()[: len(buffer.getvalue()) // 2]
    return rng.integers(0, 256, 512, dtype=np.uint8).tobytes() if k % 4 == 2 else b""


def make_file(root: Path, i: int, p) -> int:
    """Write file ``i``; returns its size in bytes."""
    from PIL import Image

    rng = np.random.default_rng((p["seed"], i))  # per file: the folder does not depend on the chunking
    path, kind = file_path(root, i, p), file_kind(i, p["images"])
    if kind == "corrupt":
        path.write_bytes(_corrupt_bytes(i - p["images"], rng))
        return path.stat().st_size
    image = Image.fromarray(_pixels(rng))
    if kind == "grey":
        image = image.convert("L")
    elif kind == "cmyk":
        image = image.convert("CMYK")
    elif kind == "palette":
        image = image.convert("P")
    elif kind == "rgba":
        image.putalpha(Image.fromarray(np.full(image.size[::-1], 200, np.uint8)))
    if path.suffix == ".jpg":
        image.save(path, quality=90)
    else:
        image.save(path)
    return path.stat().st_size


def make_chunk(root: str, start: int, stop: int, p) -> tuple[int, int]:
    """Files ``start..stop-1`` (one pool task): (files written, bytes)."""
    sizes = [make_file(Path(root), i, p) for i in range(start, stop)]
    return len(sizes), sum(sizes)


def count_files(root: Path) -> int:
    with os.scandir(root) as classes:
        return sum(len(os.listdir(c.path)) for c in classes if c.is_dir())


def folder_is_ready(folder: Path, p) -> bool:
    """The marker says these parameters were completed, and the file count agrees."""
    marker, images = folder / "dataset.json", folder / "images"
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or recorded.get("benchmark") != "data_scale":
        if images.exists() and any(images.iterdir()):
            raise UsageError(f"{images} holds files this benchmark did not make (no {marker.name}): choose another "
                             f"--folder.")
        return False
    complete = recorded.get("params") == p and recorded.get("complete")
    return bool(complete) and images.is_dir() and count_files(images) == p["images"] + p["corrupt"]


def generate(folder: Path, p, processes: int) -> dict:
    """Make the folder unless it is already there; returns the generation figures."""
    total = p["images"] + p["corrupt"]
    if folder_is_ready(folder, p):
        say(f"{folder / 'images'} already holds the {total} files of these parameters: generation skipped.")
        return {"skipped": True, "files": total}
    images, marker = folder / "images", folder / "dataset.json"
    shutil.rmtree(images, ignore_errors=True)  # ours (the marker says so), made with other parameters or unfinished
    marker.write_text(json.dumps({"benchmark": "data_scale", "params": p, "complete": False}))
    for c in range(p["classes"]):
        (images / f"n{c:05d}").mkdir(parents=True, exist_ok=True)
    start, done, size = time.perf_counter(), 0, 0
    step = max(100, min(2500, total // (8 * processes)))  # small tasks: steady progress, balanced processes
    with ProcessPoolExecutor(max_workers=processes) as pool:
        tasks = [pool.submit(make_chunk, str(images), a, min(total, a + step), p) for a in range(0, total, step)]
        for n, task in enumerate(as_completed(tasks)):
            files, written = task.result()
            done, size = done + files, size + written
            if n % max(1, len(tasks) // 20) == 0 or done == total:
                say(f"generated {done}/{total} files ({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps({"benchmark": "data_scale", "params": p, "complete": True, "generate_s": seconds}))
    return {"skipped": False, "files": total, "seconds": round(seconds, 1), "mib": round(size / MIB, 1),
            "files_per_s": round(total / seconds, 1), "processes": processes}


def kinds_made(p) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(p["images"] + p["corrupt"]):
        kind = file_kind(i, p["images"])
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# -- 2. indexing ------------------------------------------------------------------------------------

def time_indexing(images: Path, cache: Path) -> dict:
    """A scan into an empty cache, then a cache hit: what every later run pays."""
    from mimkit.data.folder_index import index_folder

    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    start = time.perf_counter()
    n = len(index_folder(images, "train", cache))
    cold = time.perf_counter() - start
    start = time.perf_counter()
    index_folder(images, "train", cache)
    warm = time.perf_counter() - start
    say(f"index of {n} files: {cold:.2f} s scanning, {warm:.3f} s from the cache")
    return {"files": n, "cold_s": round(cold, 3), "warm_s": round(warm, 4),
            "note": "directory entries were in the OS page cache (dropping it needs root)"}


# -- 3. a monitored run -----------------------------------------------------------------------------

def proc_table() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, start time)} of every process: /proc/PID/task/*/children is not always built in."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if fields[0] != "Z":  # a zombie holds no memory and is no longer working
            table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pid: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """{pid: start time} of every process below ``pid``."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, stack = {}, list(children.get(pid, []))
    while stack:
        p = stack.pop()
        found[p] = table[p][1]
        stack += children.get(p, [])
    return found


def _proc_field(path: str, key: str) -> int:
    """Bytes of a ``Key:   N kB`` line of a /proc file (0 once the process has gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def vm_rss(pid: int) -> int:
    return _proc_field(f"/proc/{pid}/status", "VmRSS:")


def pss(pid: int) -> int:
    """Proportional set size: a page shared by k processes counts 1/k in each. A forked worker's
    VmRSS already counts the parent's pages it shares, so a page it copies on write (touching a
    Python object's refcount is a write) leaves VmRSS unchanged; PSS, summed over the tree, sees it."""
    return _proc_field(f"/proc/{pid}/smaps_rollup", "Pss:")


def read_records(path: Path) -> list[dict]:
    """Complete lines of log.jsonl (the run may be writing the last one)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class Run:
    """``mimkit pretrain`` in a subprocess, its output timestamped and its process tree sampled."""

    def __init__(self, tag: str, cmd: list[str], env: dict, out_dir: Path, images_per_step: int, interval: float,
                 pss_every: int):
        self.tag, self.cmd, self.env, self.out_dir = tag, cmd, env, out_dir
        self.images_per_step, self.interval, self.pss_every = images_per_step, interval, pss_every
        self.lines: list[tuple[float, str]] = []
        self.samples: list[list] = []  # SERIES_COLUMNS
        self.banner_s = self.first_train_s = None
        self.killed_at_s = self.last_pt_at = self.last_step = None
        self.workers: dict[int, int] = {}
        self.jitter = random.Random(0)

    def _read_output(self) -> None:
        for line in self.proc.stdout:
            t = time.perf_counter() - self.t0
            self.lines.append((t, line.rstrip("\n")))
            if self.banner_s is None and line.startswith(BANNER):
                self.banner_s = t
            print(f"  [{self.tag} {t:6.1f}s] {line.rstrip()}", file=sys.stderr, flush=True)

    def _walk(self, t: float) -> tuple[int | None, int, list[int]]:
        """(images seen, epochs done) from log.jsonl, and the worker pids now."""
        below = descendants(self.proc.pid, proc_table())
        self.workers = below or self.workers  # the last set seen, for the check after a kill
        records = read_records(self.out_dir / "log.jsonl")
        train = [r for r in records if r.get("kind") == "train"]
        if train and self.first_train_s is None:
            self.first_train_s = t
        if self.last_pt_at is None and (self.out_dir / "last.pt").exists():
            self.last_pt_at = t
        self.last_step = train[-1]["step"] if train else None
        images = train[-1]["step"] * self.images_per_step if train else None
        return images, sum(r.get("kind") == "epoch" for r in records), list(below)

    def _rss_until(self, pids: list[int], until: float) -> tuple[float | None, ...]:
        """(lowest, highest) main VmRSS and the lowest workers' sum, read every FAST_READ_S until
        ``until``: at a random instant the main process holds part of a step's transient buffers
        (hundreds of MiB), between steps only what it keeps. None when a process ended first."""
        main, workers = [], []
        while True:
            now = [vm_rss(p) for p in (self.proc.pid, *pids)]
            if 0 in now:  # a process has gone (the run is ending): a partial sum is not a figure
                time.sleep(max(0.0, until - time.perf_counter()))
                break
            main.append(now[0])
            workers.append(sum(now[1:]))
            if time.perf_counter() >= until:
                break
            time.sleep(FAST_READ_S)
        if not main:
            return None, None, None
        return min(main) / MIB, max(main) / MIB, min(workers) / MIB

    def _sample(self) -> None:
        """One row of SERIES_COLUMNS, spanning one (jittered) ``interval``."""
        started = time.perf_counter()
        t = started - self.t0
        images, done, pids = self._walk(t)
        # jittered: a fixed period near the step time would sample the same phase of every step
        until = started + self.interval * self.jitter.uniform(0.5, 1.5)
        floor, peak, workers = self._rss_until(pids, until)
        main_pss = workers_pss = None
        if len(self.samples) % self.pss_every == 0 and floor is not None:  # smaps_rollup costs ~20 ms: now and then
            now = [pss(p) for p in (self.proc.pid, *pids)]
            if 0 not in now:
                main_pss, workers_pss = now[0] / MIB, sum(now[1:]) / MIB
        self.samples.append([round(t, 2), images, done, *(None if v is None else round(v, 1) for v in
                             (floor, peak, workers, main_pss, workers_pss)), len(pids)])

    def run(self, kill_when: Callable[["Run"], bool] | None = None) -> "Run":
        """Run to the end, or SIGKILL the main process once ``kill_when(self)`` holds (checked every row)."""
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        reader = threading.Thread(target=self._read_output, daemon=True)
        reader.start()
        try:
            while self.proc.poll() is None:
                self._sample()
                if kill_when is not None and kill_when(self):
                    self.kill()
                    break
        finally:
            if self.proc.poll() is None and self.killed_at_s is None:
                self.proc.kill()  # the benchmark itself failed or was interrupted: leave nothing running
        self.proc.wait()
        self.wall_s = time.perf_counter() - self.t0
        reader.join(timeout=10)  # orphaned workers may hold the pipe open a little longer
        self.out_dir.parent.joinpath(f"{self.tag}.out").write_text("".join(f"{t:8.2f} {s}\n" for t, s in self.lines))
        return self

    def kill(self) -> None:
        self.workers = descendants(self.proc.pid, proc_table())
        os.kill(self.proc.pid, signal.SIGKILL)
        self.killed_at_s = time.perf_counter() - self.t0
        say(f"run {self.tag}: SIGKILL to pid {self.proc.pid} at {self.killed_at_s:.1f} s "
            f"({len(self.workers)} worker processes)")

    def check(self) -> None:
        """A run that failed on its own is a finding, not a figure: stop with its last lines."""
        if self.killed_at_s is None and self.proc.returncode != 0:
            tail = "\n".join(s for _, s in self.lines[-15:])
            raise RuntimeError(f"run {self.tag} exited with status {self.proc.returncode}; its output ends:\n{tail}")

    def iters_per_epoch(self) -> int | None:
        match = next((re.search(r"(\d+) epochs x (\d+) it", s) for _, s in self.lines if s.startswith(BANNER)), None)
        return int(match.group(2)) if match else None


def wait_gone(workers: dict[int, int], timeout: float = 30.0) -> dict:
    """Orphaned DataLoader workers should exit once their parent has died; kill any that do not."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        table = proc_table()
        alive = [p for p, t in workers.items() if p in table and table[p][1] == t]  # same start time: not a reused pid
        if not alive:
            return {"workers": len(workers), "gone_after_s": round(time.perf_counter() - start, 2), "force_killed": []}
        time.sleep(0.2)
    for p in alive:
        os.kill(p, signal.SIGKILL)
    say(f"{len(alive)} DataLoader workers were still alive {timeout:.0f} s after the kill: killed them")
    return {"workers": len(workers), "gone_after_s": None, "force_killed": alive}


# -- figures from a run -----------------------------------------------------------------------------

SERIES_COLUMNS = ["s", "images_seen", "epochs_done", "main_rss_floor_mib", "main_rss_peak_mib", "workers_rss_mib",
                  "main_pss_mib", "workers_pss_mib", "workers"]


def slope_fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Least-squares slope in MiB per 100 k images with its standard error, and a verdict:
    ``flat`` (below the threshold by 2 standard errors), ``grows`` (above it by 2) or
    ``inconclusive``. The main process swings by a step's transient buffers (a few hundred MiB
    freed and taken again every step, sampled at a random phase), so its slope needs the error
    bar; the workers' memory is smooth and gets a tight one."""
    if len(x) < 3:
        return {"verdict": None, "why": "fewer than 3 points"}
    (slope, intercept), n = np.polyfit(x, y, 1), len(x)
    residual = y - (slope * x + intercept)
    error = np.sqrt(residual @ residual / max(1, n - 2) / max(1e-12, ((x - x.mean()) ** 2).sum()))
    slope, error = slope * 1e5, error * 1e5
    verdict = ("flat" if abs(slope) + 2 * error < FLAT_MIB_PER_100K else
               "grows" if slope - 2 * error > FLAT_MIB_PER_100K else "inconclusive")
    return {"mib_per_100k_images": round(float(slope), 2), "stderr": round(float(error), 2), "verdict": verdict,
            "first_mib": round(float(y[0]), 1), "last_mib": round(float(y[-1]), 1), "max_mib": round(float(y.max()), 1)}


def _column(rows: list[list], *indices: int) -> np.ndarray:
    """The sum of the given columns of each row."""
    return np.array([sum(r[i] for i in indices) for r in rows], dtype=np.float64)


def _per_record_floor(rows: list[list], *indices: int) -> tuple[np.ndarray, np.ndarray]:
    """(images seen, lowest value) per log record: the rows sharing one images-seen value span
    ``log_every`` steps, so their minimum is the memory kept between steps, free of the phase
    at which the rows happened to read."""
    seen = sorted({r[1] for r in rows})
    return np.array(seen, dtype=np.float64), np.array([_column([r for r in rows if r[1] == x], *indices).min()
                                                       for x in seen])


def fit(samples: list[list], epoch: int, lo: float, hi: float) -> dict:
    """Memory against images seen while ``epoch`` (0-based) trains and lo < images <= hi.

    The verdict rests on the main process's and the workers' VmRSS floors (one point per log
    record) and the workers' PSS (which sees their copy-on-write); the sums are reported too."""
    rows = [r for r in samples if r[1] is not None and r[2] == epoch and lo < r[1] <= hi and r[3] is not None]
    with_pss = [r for r in rows if r[6] is not None]
    if len({r[1] for r in rows}) < 3:
        return {"verdict": None, "why": "fewer than 3 log records in the window: lower --log-every"}
    xp = _column(with_pss, 1)
    out = {"samples": len(rows), "records": len({r[1] for r in rows}), "pss_samples": len(with_pss),
           "images": [int(rows[0][1]), int(rows[-1][1])],
           "main_rss_floor": slope_fit(*_per_record_floor(rows, 3)),
           "workers_rss": slope_fit(*_per_record_floor(rows, 5)),
           "total_rss": slope_fit(*_per_record_floor(rows, 3, 5))}
    if len(set(xp)) >= 3:
        out.update(workers_pss=slope_fit(xp, _column(with_pss, 7)), tree_pss=slope_fit(xp, _column(with_pss, 6, 7)))
    verdicts = {out[k]["verdict"] for k in ("main_rss_floor", "workers_rss", "workers_pss") if k in out}
    out["verdict"] = "grows" if "grows" in verdicts else "flat" if verdicts == {"flat"} else "inconclusive"
    return out


def rss_figures(run: Run, epoch_images: int, warmup: float) -> dict:
    """Fits over epoch 1's warm-up (workers starting, allocator pools filling; also where copy-on-write
    of objects the workers touch happens, since a random order soon touches every page), over the
    rest of epoch 1, and over epoch 2."""
    samples = run.samples
    peak = {f"{name}_max": max((s[i] for s in samples if s[i] is not None), default=None)
            for i, name in enumerate(SERIES_COLUMNS) if i >= 3}
    return {
        "interval_s": run.interval, "warmup_images": int(warmup * epoch_images),
        "flat_below_mib_per_100k": FLAT_MIB_PER_100K,
        "epoch1_warmup": fit(samples, 0, 0, warmup * epoch_images),
        "epoch1_after_warmup": fit(samples, 0, warmup * epoch_images, epoch_images),
        "epoch2": fit(samples, 1, epoch_images, 2 * epoch_images),
        "whole_run": peak,
        "note": "main_rss_floor: the main process's lowest VmRSS in each row (between a step's transient buffers), "
                "fitted per log record (its rows' minimum); "
                "workers_rss sums each worker's VmRSS, which counts the pages it still shares with the main process "
                "and so cannot show copy-on-write; PSS counts every page once and sees the pages a worker copies",
        "series_columns": SERIES_COLUMNS, "series": samples,
    }


def epoch_figures(out_dir: Path) -> list[dict]:
    return [{"epoch": r["epoch"] + 1, "epoch_time_s": round(r["epoch_time_s"], 2),
             "images_per_s": round(r["images_per_s"], 1), "unreadable_files": r["unreadable_files"]}
            for r in read_records(out_dir / "log.jsonl") if r.get("kind") == "epoch"]


def expected_unreadable(images: Path, cache: Path, cfg, planted: set[str], epochs: int) -> list[dict]:
    """Replay each epoch's seeded order and the skip rule: which planted files the run meets.

    An epoch takes ``len // batch * batch`` samples (drop_last); a broken file is replaced by the
    file ``7919 % len`` further on (LazyImageDataset.readable), which may be broken too.
    """
    from mimkit.data.folder_index import index_folder
    from mimkit.engine.sampling import SeededSampler

    files = index_folder(images, "train", cache).files
    n, batch, accum = len(files), cfg.train.batch_size, cfg.train.accum_iter
    stride, visited = 7919 % n or 1, n // batch // accum * accum * batch  # the loop's iters_per_epoch batches
    sampler, out = SeededSampler(n, cfg.train.seed), []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        met: set[str] = set()
        for position, (index, _) in enumerate(sampler):
            if position == visited:
                break
            for _ in range(64):
                if files[index] not in planted:
                    break
                met.add(files[index])
                index = (index + stride) % n
        out.append({"epoch": epoch + 1, "expected": len(met), "planted_not_met": len(planted - met)})
    return out


def unreadable_figures(run: Run, images: Path, cache: Path, cfg, p, epochs: int) -> dict:
    planted = {str(file_path(images.resolve(), i, p)) for i in range(p["images"], p["images"] + p["corrupt"])}
    summary = json.loads((run.out_dir / "summary.json").read_text())["unreadable_files"]
    expected = expected_unreadable(images, cache, cfg, planted, epochs)
    per_epoch = [e["unreadable_files"] for e in epoch_figures(run.out_dir)]
    return {
        "planted": p["corrupt"], "summary_count": summary["count"], "summary_fraction": summary["fraction"],
        "per_epoch": per_epoch, "expected_per_epoch": [e["expected"] for e in expected],
        "planted_not_visited_per_epoch": [e["planted_not_met"] for e in expected],
        "counts_as_expected": per_epoch == [e["expected"] for e in expected],
        "first_are_planted": all(f in planted for f in summary["first"]), "first": summary["first"],
        "why_fewer": "drop_last: an epoch reads len // batch * batch of the shuffled files, so a planted file among "
                     "the remainder is not read that epoch; expected_per_epoch replays the seeded order",
    }


# -- 4. the kill -9 check ---------------------------------------------------------------------------

def compare_models(a: Path, b: Path) -> dict:
    import torch

    from mimkit.checkpoint import load_file

    ca, cb = load_file(a), load_file(b)
    ma, mb = ca["model"], cb["model"]
    differ = [k for k in ma if k not in mb or not torch.equal(ma[k], mb[k])]
    exact = not differ and ma.keys() == mb.keys() and ca["epoch"] == cb["epoch"]
    return {"resumed_exactly": exact, "tensors": len(ma), "differing": differ[:10],
            "epochs": [ca["epoch"] + 1, cb["epoch"] + 1]}


def kill_trigger(cfg, iters: int, kill_at: float, epoch_time_s: float) -> tuple[Callable[[Run], bool], str]:
    """When to SIGKILL run B: at its first log record past ``kill_at`` of epoch 2, so the kill lands
    mid-epoch however fast the shared machine runs B; when no record falls there (``log_every``
    too coarse), ``kill_at`` of A's epoch-2 time after epoch 1's last.pt appears."""
    every, accum = cfg.train.log_every, cfg.train.accum_iter
    first = math.ceil(max(1.0, kill_at * iters) / every) * every  # iterations into epoch 2 of that record
    if first < iters:
        target = (iters + first) // accum
        return (lambda run: run.last_step is not None and run.last_step >= target), f"log record at step {target}"
    wait = kill_at * epoch_time_s
    return (lambda run: run.last_pt_at is not None and run.samples[-1][0] - run.last_pt_at >= wait,
            f"{wait:.1f} s after epoch 1's last.pt")


def resume_check(make_run, reference: Run, cfg, iters: int, kill_at: float) -> dict:
    """B is killed in the middle of epoch 2, then rerun in its output_dir; its last.pt must equal A's."""
    from mimkit.checkpoint import load_file

    trigger, when = kill_trigger(cfg, iters, kill_at, epoch_figures(reference.out_dir)[1]["epoch_time_s"])
    killed = make_run("B").run(kill_when=trigger)
    killed.check()
    if killed.killed_at_s is None:
        raise RuntimeError("run B finished before it could be killed: raise --epochs or lower --kill-at")
    gone = wait_gone(killed.workers)
    ckpt = load_file(killed.out_dir / "last.pt")
    logged = [r["step"] for r in read_records(killed.out_dir / "log.jsonl") if r.get("kind") == "train"]
    steps_per_epoch = iters // cfg.train.accum_iter
    resumed = make_run("B_resumed").run()
    resumed.check()
    say("comparing every tensor of A's and B's last.pt")
    return {
        **compare_models(reference.out_dir / "last.pt", resumed.out_dir / "last.pt"),
        "kill": {"time_to_banner_s": _round(killed.banner_s), "trigger": when, "at_s": round(killed.killed_at_s, 1),
                 "checkpoint_epoch_at_kill": ckpt["epoch"] + 1, "last_logged_step": logged[-1] if logged else None,
                 "steps_per_epoch": steps_per_epoch,
                 "mid_epoch_2": ckpt["epoch"] == 0 and bool(logged) and logged[-1] > steps_per_epoch},
        "orphaned_workers": gone,
        "resumed_run": {"said_resuming": any(s.startswith("Resuming from") for _, s in resumed.lines),
                        "time_to_banner_s": _round(resumed.banner_s), "wall_s": round(resumed.wall_s, 1)},
    }


# -- the command line -------------------------------------------------------------------------------

_FLAT_LIST = re.compile(r"\[\s+((?:[-\d.eE+]+|null)(?:,\s+(?:[-\d.eE+]+|null))*)\s+\]")


def compact_json(report: dict) -> str:
    """Indented JSON with each list of numbers on one line (the RSS series is hundreds of rows)."""
    return _FLAT_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", json.dumps(report, indent=2))


def _round(x, digits=2):
    return None if x is None else round(x, digits)


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="runs/bench_200k", help="images, index cache and runs live here")
    parser.add_argument("--images", type=int, default=200000, help="readable image files")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--corrupt", type=int, default=50, help="broken .jpg files on top of --images")
    parser.add_argument("--seed", type=int, default=0, help="of the generated files")
    parser.add_argument("--gen-processes", type=int, default=2)
    parser.add_argument("--model-args", default="model.name=mae_vit_tiny_patch4 model.img_size=32 model.depth=2 "
                                                "model.decoder_depth=1", help="model overrides, one string")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--log-every", type=int, default=20, help="train.log_every: the resolution of images seen")
    parser.add_argument("--device", default="cpu", help="train.device (the resume is compared bit for bit: on a "
                                                        "GPU that also needs deterministic kernels)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for the runs")
    parser.add_argument("--interval", type=float, default=0.5, help="mean seconds per row of the memory series")
    parser.add_argument("--pss-interval", type=float, default=5.0, help="seconds between PSS reads (~20 ms each)")
    parser.add_argument("--rss-warmup", type=float, default=0.05, help="fraction of epoch 1 fitted on its own")
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of epoch 2 run B trains before SIGKILL")
    parser.add_argument("--resume-check", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def run_overrides(args) -> list[str]:
    try:
        model = shlex.split(args.model_args)
    except ValueError as exc:
        raise UsageError(f"--model-args cannot be split into words ({exc}): quote it as one string.") from None
    return ["data.in_memory=false", f"data.num_workers={args.workers}", f"train.batch_size={args.batch_size}",
            f"train.epochs={args.epochs}", "train.warmup_epochs=0", "train.progress=false",
            f"train.log_every={args.log_every}", f"train.device={args.device}", *model, *args.set]


def check_args(args, overrides: list[str]):
    """Refuse what would fail (or waste an hour) later, in one sentence; returns the runs' config."""
    from mimkit.config import load_config
    from mimkit.errors import MimkitError

    for name in ("images", "classes", "batch_size", "epochs", "log_every", "gen_processes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} is {getattr(args, name)}: give a whole number of at least 1.")
    if args.corrupt < 0 or args.workers < 0 or args.interval <= 0 or args.pss_interval <= 0:
        raise UsageError("--corrupt and --workers must be 0 or more, --interval and --pss-interval more than 0.")
    if args.classes > args.images or args.batch_size > args.images:
        raise UsageError(f"--classes ({args.classes}) and --batch-size ({args.batch_size}) must not exceed --images "
                         f"({args.images}).")
    if not 0 <= args.rss_warmup < 1 or not 0 < args.kill_at < 1:
        raise UsageError("--rss-warmup must be in [0, 1) and --kill-at in (0, 1): they are fractions of an epoch.")
    if args.resume_check and args.epochs < 2:
        raise UsageError(f"--resume-check kills run B in epoch 2, so it needs --epochs 2 or more (got {args.epochs}); "
                         f"or pass --no-resume-check.")
    try:
        cfg = load_config(None, [*overrides, "data.path=.", "output_dir=."])
    except MimkitError as exc:
        raise UsageError(f"the run overrides are not valid: {exc}") from None
    cap = cfg.data.max_bad_fraction * (args.images + args.corrupt)
    if args.corrupt > cap:
        raise UsageError(f"--corrupt {args.corrupt} is more than data.max_bad_fraction={cfg.data.max_bad_fraction:g} "
                         f"of {args.images + args.corrupt} files ({cap:.0f}): the run would stop by design; plant "
                         f"fewer.")
    return cfg


def check_writable(folder: Path, out: str | None) -> None:
    for target in [folder] + ([Path(out).parent] if out else []):
        try:
            target.mkdir(parents=True, exist_ok=True)
            probe = target / f".data_scale_probe_{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"Cannot write to {target} ({exc.strerror or exc}): choose a writable folder.") from None


def machine() -> dict:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cores_usable": cores, "load_average_at_start": list(os.getloadavg()),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def benchmark(args, cfg, overrides: list[str]) -> dict:
    folder = Path(args.folder).resolve()
    p = {"images": args.images, "classes": args.classes, "corrupt": args.corrupt, "seed": args.seed,
         "generator": GENERATOR_VERSION}
    report = {"benchmark": "data_scale", "acceptance": None,  # filled in last, read first
              "machine": machine(), "folder": str(folder), "files": kinds_made(p)}
    report["generation"] = generate(folder, p, args.gen_processes)
    images = folder / "images"
    report["indexing"] = time_indexing(images, folder / "index_bench")
    env = {**os.environ, "MIMKIT_DATA": str(folder / "mimkit_data"), "PYTHONUNBUFFERED": "1"}
    shutil.rmtree(folder / "mimkit_data" / "index", ignore_errors=True)  # run A starts on a folder never indexed
    shutil.rmtree(folder / "runs", ignore_errors=True)
    (folder / "runs").mkdir()
    exe = Path(sys.executable).with_name("mimkit")
    head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "mimkit"]
    per_step = cfg.train.batch_size * cfg.train.accum_iter

    def make_run(tag: str) -> Run:
        out_dir = folder / "runs" / tag.split("_")[0]  # B_resumed continues in B's output_dir
        cmd = [*head, "pretrain", f"data.path={images}", *overrides, f"output_dir={out_dir}"]
        return Run(tag, cmd, env, out_dir, per_step, args.interval, max(1, round(args.pss_interval / args.interval)))

    say("run A: uninterrupted, index cache empty")
    a = make_run("A").run()
    a.check()
    iters = a.iters_per_epoch() or (args.images + args.corrupt) // per_step * cfg.train.accum_iter
    epoch_images = iters * cfg.train.batch_size
    report["command"] = shlex.join(a.cmd)
    report["run"] = {"time_to_banner_s": _round(a.banner_s), "time_to_first_train_record_s": _round(a.first_train_s),
                     "first_record_resolution_s": args.interval, "iters_per_epoch": iters,
                     "epochs": epoch_figures(a.out_dir), "wall_s": round(a.wall_s, 1)}
    report["rss"] = rss_figures(a, epoch_images, args.rss_warmup)
    report["unreadable"] = unreadable_figures(a, images, folder / "index_bench", cfg, p, args.epochs)
    if args.resume_check:
        report["resume"] = resume_check(make_run, a, cfg, iters, args.kill_at)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["acceptance"] = acceptance(report)
    return report


def acceptance(report: dict) -> dict:
    """The acceptance check's four claims, each as this run measured it."""
    banner, unreadable = report["run"]["time_to_banner_s"], report["unreadable"]
    return {
        "starts_training_within_60_s": banner is not None and banner < 60,
        "memory_vs_images_seen": {k: report["rss"][k]["verdict"] for k in ("epoch1_after_warmup", "epoch2")},
        "corrupt_files_counted_and_skipped": unreadable["counts_as_expected"] and unreadable["first_are_planted"],
        "resumed_exactly_after_kill_9": report["resume"]["resumed_exactly"] if "resume" in report else None,
    }


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through Run.run, which kills the run it was watching


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        overrides = run_overrides(args)
        cfg = check_args(args, overrides)
        check_writable(Path(args.folder), args.out)
        report = benchmark(args, cfg, overrides)
    except UsageError as exc:
        print(f"data_scale.py: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"data_scale.py: {exc}", file=sys.stderr)
        return 1
    text = compact_json(report)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
