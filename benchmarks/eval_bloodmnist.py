"""Evaluation benchmark on BloodMNIST: fine-tuning and linear probing of a pretrained MAE ViT-Ti/4.

Three studies, each printed as one JSON object and saved to benchmarks/results/eval_<study>.json:

* ``full``: full-label fine-tuning (configs/finetune/vit_tiny_p4_28.yaml); test ACC/AUC of best.pt
  (selected on the val split). Target: ACC >= 95.8 % (MedMNIST v2 ResNet-18 at 28 px).
* ``finetune_1pct``: 1 % of the training labels (stratified, seed 0, ~120 images), the same recipe
  (batch 16, blr 4e-3, 100 epochs, crop [0.5, 1], drop path 0.1) from the pretrained checkpoint and from random initialisation; the last epoch is reported
  (no validation split: with 120 labels a 1712-image val set would be unrealistic).
* ``linprobe_1pct``: 1 % of the labels, MAE linear probe (configs/linprobe/vit_tiny_p4_28.yaml) of
  the pretrained and of a randomly initialised frozen encoder.

    python benchmarks/eval_bloodmnist.py --study full finetune_1pct linprobe_1pct \
        --checkpoint runs/mae_blood_cpu2/last.pt --data ../shared/datasets/bloodmnist.npz
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ONE_PERCENT = ["data.label_fraction=0.01", "data.val_split=null", "train.progress=false"]


def _run(command: list[str]) -> float:
    from mimkit.cli import main

    t0 = time.perf_counter()
    code = main(command)
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit status {code}")
    return wall


def _summary(metrics_json: Path, wall: float) -> dict:
    result = json.loads(metrics_json.read_text())
    m = result["metrics"]
    return {"test_acc": round(m["top1"], 2), "test_auc": round(m["auc"], 4), "reported": result["reported"],
            "reported_epoch": result[result["reported"]]["epoch"], "wall_time_s": round(wall, 1),
            "train_images_per_s": round(result["train"].get("images_per_s", 0.0), 1),
            "metrics_json": str(metrics_json)}


def study_full(args) -> dict:
    out = Path(args.runs) / args.full_dir
    if not (out / "finetune_metrics.json").is_file():
        wall = _run(["finetune", "--checkpoint", args.checkpoint, "--data", args.data, "--config",
                     "configs/finetune/vit_tiny_p4_28.yaml", f"output_dir={out}", "train.progress=false"])
    else:  # the run was started on its own (it takes the longest); read its results
        wall = json.loads((out / "finetune_metrics.json").read_text())["train"]["wall_time_s"]
    return {"pretrained": _summary(out / "finetune_metrics.json", wall)}


def study_finetune_1pct(args) -> dict:
    result = {}
    for init in ("pretrained", "random"):
        out = Path(args.runs) / f"eval_finetune_1pct_{init}"
        wall = _run(["finetune", "--checkpoint", args.checkpoint, "--data", args.data, "--config",
                     "configs/finetune/vit_tiny_p4_28.yaml", f"output_dir={out}", f"finetune.init={init}",
                     # ~120 images: batch 16 for ~700 steps over 100 epochs, blr 4e-3 (lr 2.5e-4); with so few
                     # crop [0.5, 1] and drop path 0.1: the settings these 1 % results were measured with
                     "train.epochs=100", "train.warmup_epochs=10", "train.batch_size=16", "train.blr=4e-3",
                     "finetune.crop_scale=[0.5,1.0]", "finetune.drop_path=0.1", "train.resume=false",
                     *ONE_PERCENT])
        result[init] = _summary(out / "finetune_metrics.json", wall)
    result["gain_points"] = round(result["pretrained"]["test_acc"] - result["random"]["test_acc"], 2)
    return result


def study_linprobe_1pct(args) -> dict:
    result = {}
    for init in ("pretrained", "random"):
        out = Path(args.runs) / f"eval_linprobe_1pct_{init}"
        wall = _run(["linprobe", "--checkpoint", args.checkpoint, "--data", args.data, "--config",
                     "configs/linprobe/vit_tiny_p4_28.yaml", f"output_dir={out}", f"linprobe.init={init}",
                     "train.resume=false", *ONE_PERCENT])
        result[init] = _summary(out / "linprobe_metrics.json", wall)
    result["gain_points"] = round(result["pretrained"]["test_acc"] - result["random"]["test_acc"], 2)
    return result


STUDIES = {"full": study_full, "finetune_1pct": study_finetune_1pct, "linprobe_1pct": study_linprobe_1pct}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    p.add_argument("--checkpoint", default="runs/mae_blood_cpu2/last.pt")
    p.add_argument("--data", default="../shared/datasets/bloodmnist.npz")
    p.add_argument("--runs", default="runs", help="parent folder of the run directories")
    p.add_argument("--full-dir", default="eval_finetune_full",
                   help="run directory of the full-label fine-tune (read if it already holds finetune_metrics.json)")
    args = p.parse_args()
    for name in args.study:
        report = {"study": name, "checkpoint": args.checkpoint, "data": args.data,
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
                             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
                  **STUDIES[name](args)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"eval_{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
