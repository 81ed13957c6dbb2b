"""Shared by the quality benchmarks: run the mimkit CLI as a user does and read its results.

Every command runs as a subprocess (``python -m mimkit ...`` from the repository), so the numbers
are what a user gets from the CLI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "mimkit", *cmd], cwd=REPO, env=env, capture_output=True, text=True)


def subset_npz(data: str, out: Path, max_train: int, max_eval: int, seed: int = 0) -> str:
    """A smaller .npz (random train images, first val/test images) for quick end-to-end checks."""
    import numpy as np

    with np.load(data) as f:
        arrays = {k: f[k] for k in f.files}
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(arrays["train_images"]))[:max_train])
    small = {}
    for split in ("train", "val", "test"):
        if f"{split}_images" not in arrays:
            continue
        idx = keep if split == "train" else np.arange(min(max_eval, len(arrays[f"{split}_images"])))
        small[f"{split}_images"], small[f"{split}_labels"] = arrays[f"{split}_images"][idx], arrays[f"{split}_labels"][idx]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **small)
    return str(out)


def knn(ckpt: Path, data: str, encoder: str | None, out: Path) -> dict:
    cmd = ["knn", "--checkpoint", str(ckpt), "--data", data, "--k", "20", "--out", str(out)]
    if encoder:
        cmd += ["--encoder", encoder]
    t0 = time.perf_counter()
    proc = run(cmd)
    if proc.returncode != 0:
        return {"knn_error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    result = json.loads(out.read_text())
    return {"knn_top1_k20": result["accuracy"]["20"]["top1"], "knn_wall_s": round(time.perf_counter() - t0, 1)}


def linprobe(ckpt: Path, data: str, encoder: str | None, out_dir: Path, fraction: float) -> dict:
    """1 %-label MAE linear probe, the protocol of benchmarks/eval_bloodmnist.py (configs/linprobe/)."""
    cmd = ["linprobe", "--checkpoint", str(ckpt), "--data", data]
    if encoder:
        cmd += ["--encoder", encoder]
    config = REPO / "configs" / "linprobe" / "vit_tiny_p4_28.yaml"
    if config.is_file():
        cmd += ["--config", str(config)]
    cmd += [f"data.label_fraction={fraction}", "data.val_split=null", "train.progress=false", "train.resume=false",
            f"output_dir={out_dir}"]
    t0 = time.perf_counter()
    proc = run(cmd)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        if "invalid choice: 'linprobe'" in proc.stderr:
            reason = "mimkit linprobe is not available in this version"
        return {"linprobe_error": reason}
    metrics = out_dir / "linprobe_metrics.json"
    if metrics.is_file():
        top1 = json.loads(metrics.read_text())["metrics"]["top1"]
    else:  # older output layout: read the printed summary
        match = re.findall(r"top-1\D*([0-9]+(?:\.[0-9]+)?)", proc.stdout)
        if not match:
            return {"linprobe_error": f"no top-1 in the output: {proc.stdout.strip()[-200:]}"}
        top1 = float(match[-1])
    return {"linprobe_top1": round(top1, 2), "linprobe_wall_s": round(time.perf_counter() - t0, 1)}




def alternating_step_speed(models: dict[str, tuple[str, dict]], batch_size: int, steps: int, warmup: int,
                           precision: str, img_size: int = 28) -> dict:
    """Train steps (forward + backward + AdamW) of several presets, alternating on one process so that
    all see the same machine load; medians of wall time and process CPU time per step.

    models: {label: (preset name, overrides)}; random [batch, 3, img_size, img_size] images.
    """
    import statistics

    import torch

    import mimkit
    from mimkit.engine.optim import build_adamw

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(0)
    runs = {}
    for label, (name, overrides) in models.items():
        model = mimkit.create_model(name, **overrides)
        runs[label] = (model, build_adamw(model, 1e-4, 0.05, (0.9, 0.95)), {"wall": [], "cpu": []})
    images = torch.randn(batch_size, 3, img_size, img_size)
    for i in range(warmup + steps):
        for model, opt, times in runs.values():
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = model(images, sample_seeds=torch.arange(batch_size) + i * batch_size).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if hasattr(model, "after_optimizer_step"):
                model.after_optimizer_step(0.0)
            if i >= warmup:
                times["wall"].append(time.perf_counter() - t0)
                times["cpu"].append(time.process_time() - c0)
    out: dict = {"batch_size": batch_size, "precision": precision, "steps": steps, "threads": torch.get_num_threads()}
    for label, (_, _, times) in runs.items():
        wall, cpu = statistics.median(times["wall"]), statistics.median(times["cpu"])
        out[label] = {"images_per_s": round(batch_size / wall, 1), "step_s_median": round(wall, 3),
                      "cpu_s_per_step": round(cpu, 3)}
    return out
