"""Quality benchmark: MAE vs DAMA_rand vs DAMA_adap on a MedMNIST file, same epochs and recipe.

For each method: ``mimkit pretrain`` (MAE with configs/mae/vit_tiny_p4_28.yaml, both DAMA variants
with configs/dama/vit_tiny_p4_28.yaml, DAMA_rand adding ``model.student2_mask=random``), then
for every encoder (MAE: one; DAMA: student1 and student2) weighted k-NN (``mimkit knn``, k=20,
T=0.07, [CLS]) and a 1 %-label linear probe (``mimkit linprobe --config configs/linprobe/vit_tiny_p4_28.yaml
data.label_fraction=0.01``, as benchmarks/eval_bloodmnist.py; the column says "n/a" with the
reason when that command is missing or fails). All commands run
as subprocesses, so the numbers are what a user gets from the CLI. Prints one JSON line per
encoder, then a markdown table; writes both to ``--out-root``.

    # the full comparison (40 epochs each; hours on a CPU, minutes on a GPU)
    python benchmarks/dama_bloodmnist.py --data ../shared/datasets/bloodmnist.npz --out-root runs/dama_bench
    # end-to-end check on a small budget
    python benchmarks/dama_bloodmnist.py --max-train 512 --max-eval 256 --out-root /tmp/dama_check \
        train.epochs=1 train.warmup_epochs=0 train.batch_size=128

Every run trains in bf16 (the MAE config alone defaults to fp32, README); extra ``key=value``
arguments are passed to every pretraining run after that and win.

``--speed`` instead measures the train-step cost of DAMA relative to MAE (28-px presets, random
images, forward + backward + AdamW, bf16 autocast): MAE and DAMA steps alternate, so both see
the same machine load, and both wall-clock images/s and process CPU seconds per step (robust
on a shared CPU) are reported:

    python benchmarks/dama_bloodmnist.py --speed --batch-size 256 --steps 6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cli_runs import REPO, alternating_step_speed, knn as _knn, linprobe as _linprobe, run as _run, subset_npz as _subset_npz

# Every run trains in bf16, the precision of the DAMA configs; the MAE config's own default is fp32.
SHARED_OVERRIDES = ["train.precision=bf16", "train.progress=false"]
METHODS = {
    "MAE": ("configs/mae/vit_tiny_p4_28.yaml", []),
    "DAMA_rand": ("configs/dama/vit_tiny_p4_28.yaml", ["model.student2_mask=random"]),
    "DAMA_adap": ("configs/dama/vit_tiny_p4_28.yaml", ["model.student2_mask=adaptive"]),
}


def measure_speed(batch_size: int, steps: int, warmup: int, precision: str) -> dict:
    """Alternating MAE / DAMA train steps on one process; medians of wall time and CPU time per step."""
    out = alternating_step_speed({"mae_vit_tiny_patch4": ("mae_vit_tiny_patch4", {"norm_pix_loss": True}),
                                  "dama_vit_tiny_patch4": ("dama_vit_tiny_patch4", {"norm_pix_loss": True})},
                                 batch_size, steps, warmup, precision)
    mae, dama = out["mae_vit_tiny_patch4"], out["dama_vit_tiny_patch4"]
    out["dama_over_mae_wall"] = round(dama["step_s_median"] / mae["step_s_median"], 2)
    out["dama_over_mae_cpu"] = round(dama["cpu_s_per_step"] / mae["cpu_s_per_step"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "bloodmnist.npz"))
    p.add_argument("--out-root", default="runs/dama_bench")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--label-fraction", type=float, default=0.01)
    p.add_argument("--max-train", type=int, default=None, help="pretrain on this many random train images (checks)")
    p.add_argument("--max-eval", type=int, default=None, help="with --max-train: val/test images kept")
    p.add_argument("--skip-linprobe", action="store_true")
    p.add_argument("--speed", action="store_true", help="only measure DAMA vs MAE train-step speed")
    p.add_argument("--batch-size", type=int, default=256, help="--speed: batch size")
    p.add_argument("--steps", type=int, default=6, help="--speed: timed steps per model (after 2 warm-up steps)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="--speed: autocast dtype")
    p.add_argument("overrides", nargs="*", help="key=value for every pretraining run, e.g. train.epochs=1")
    args = p.parse_args()
    if args.speed:
        print(json.dumps(measure_speed(args.batch_size, args.steps, 2, args.precision)), flush=True)
        return

    root = Path(args.out_root)
    data = args.data
    if args.max_train:
        data = _subset_npz(data, root / "data_subset.npz", args.max_train, args.max_eval or args.max_train)
    rows = []
    for method in args.methods.split(","):
        config, extra = METHODS[method]
        run_dir = root / method
        t0 = time.perf_counter()
        proc = _run(["pretrain", "--config", config, f"data.path={data}", f"output_dir={run_dir}",
                     *SHARED_OVERRIDES, *extra, *args.overrides])
        pretrain_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{method}: pretraining failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        encoders = [None] if method == "MAE" else ["student1", "student2"]
        for encoder in encoders:
            tag = encoder or "encoder"
            row = {"method": method, "encoder": tag, "epochs": summary.get("final_epoch"),
                   "pretrain_wall_s": round(pretrain_s, 1), "pretrain_images_per_s": round(summary["images_per_s"], 1),
                   "final_loss": summary.get("final_loss")}
            # student1 is a DAMA checkpoint's default encoder, so it needs no --encoder flag.
            pick = encoder if encoder == "student2" else None
            row.update(_knn(run_dir / "last.pt", data, pick, run_dir / f"knn_{tag}.json"))
            if not args.skip_linprobe:
                row.update(_linprobe(run_dir / "last.pt", data, pick, run_dir / f"linprobe_{tag}", args.label_fraction))
            rows.append(row)
            print(json.dumps(row), flush=True)

    lines = [f"| method | encoder | k-NN top-1 % (k=20) | linear probe top-1 % ({args.label_fraction:.0%} labels) | "
             "pretrain wall | pretrain img/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        knn = f"{r['knn_top1_k20']:.2f}" if "knn_top1_k20" in r else f"n/a ({r.get('knn_error')})"
        lin = f"{r['linprobe_top1']:.2f}" if "linprobe_top1" in r else f"n/a ({r.get('linprobe_error', 'skipped')})"
        wall = f"{r['pretrain_wall_s'] / 60:.1f} min" if "pretrain_wall_s" in r else ""
        ips = f"{r['pretrain_images_per_s']:.0f}" if "pretrain_images_per_s" in r else ""
        lines.append(f"| {r['method']} | {r['encoder']} | {knn} | {lin} | {wall} | {ips} |")
    table = "\n".join(lines)
    print(table)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
