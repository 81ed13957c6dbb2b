"""End to end from JPEG files: `mimkit pretrain` on a synthetic ImageNet-like folder against the
same model's step on random tensors (`benchmarks/throughput.py`), in one run.

    # the GPU check of issue 15 (one H100/H200): MAE ViT-B/16, 224 px, batch 256, bf16
    python benchmarks/loader_e2e.py --images 20000 --model mae_vit_base_patch16 --batch-size 256 \
        --precision bf16 --device cuda --out benchmarks/results/loader_e2e_vit_base_gpu.json
    # CPU smoke: a tiny model on a few hundred images
    python benchmarks/loader_e2e.py --images 600 --model mae_vit_tiny_patch4 --img-size 32 --batch-size 32

The folder comes from ``benchmarks/data_throughput.py`` (generated once). The pretraining run
decodes lazily (``data.in_memory=false``, ``data.num_workers=auto`` unless ``--workers``); its
``log.jsonl`` gives images/s and ``data_wait_fraction`` (the share of each log interval the
loop waited for its next batch) per interval, of which the first (worker start-up, warm-up) is
dropped. The random-tensor figure is throughput.py's eager configuration of the same precision.
Prints one JSON object: both rates, their ratio and the median wait fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import make_folder  # noqa: E402  (the same synthetic folder)


def pretrain_rates(folder: Path, args, out: Path) -> list[dict]:
    argv = [sys.executable, "-m", "mimkit", "pretrain", f"model.name={args.model}", f"data.path={folder}",
            "data.in_memory=false", f"data.num_workers={args.workers}", f"train.batch_size={args.batch_size}",
            "train.epochs=1", "train.warmup_epochs=0", "train.progress=false", "train.log_every=10",
            f"train.precision={args.precision}", f"train.device={args.device}", f"output_dir={out}",
            "train.resume=false", *([f"model.img_size={args.img_size}"] if args.img_size else [])]
    subprocess.run(argv, check=True)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"][1:]


def random_tensor_rate(args) -> float:
    here = Path(__file__).resolve().parent
    argv = [sys.executable, str(here / "throughput.py"), "--model", args.model, "--batch-size", str(args.batch_size),
            "--device", args.device, "--configs", f"eager-{args.precision}"]
    if args.img_size:
        argv += ["--img-size", str(args.img_size)]
    lines = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{") and "images_per_s" in line]
    return float(rows[0]["images_per_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="runs/bench_jpegs")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--model", default="mae_vit_base_patch16")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder = Path(args.folder) / "train"
    make_folder(folder, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        records = pretrain_rates(folder, args, Path(tmp) / "run")
    if not records:
        print("loader_e2e: error: the run logged fewer than two intervals: give more --images.", file=sys.stderr)
        return 2
    e2e = statistics.median(r["images_per_s"] for r in records)
    tensors = random_tensor_rate(args)
    report = {"benchmark": "loader_e2e", "model": args.model, "batch_size": args.batch_size,
              "precision": args.precision, "device": args.device, "workers": args.workers,
              "cpu_count": os.cpu_count(), "images": args.images,
              "e2e_images_per_s": e2e, "random_tensor_images_per_s": tensors, "ratio_e2e_over_tensors": e2e / tensors,
              "data_wait_fraction_median": statistics.median(r["data_wait_fraction"] for r in records),
              "intervals": [{k: r[k] for k in ("step", "images_per_s", "data_wait_fraction")} for r in records]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
