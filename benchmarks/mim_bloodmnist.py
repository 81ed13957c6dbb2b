"""Quality benchmark: MAE ViT-Ti/4 vs SimMIM ViT-Ti/4 vs SimMIM Swin vs DDMIM Swin on a MedMNIST file.

One equal budget for every method: the same epochs, warmup, batch (256), precision (``--precision``,
fp32 by default: bf16 autocast ran 13-18x slower than fp32 on the 2-core CPU of our runs) and data;
each method keeps its own recipe otherwise (its 28-px config: lr, weight decay, betas, crops, mask).
For each method it writes the untrained network of the run's seed as ``untrained.pt`` (the epoch-0
model ``mimkit pretrain`` starts from), pretrains, and evaluates both with the CLI: weighted k-NN
(k=20, T=0.07; the encoder's default pooling: [CLS] for ViT, mean token for Swin) and the 1 %-label
linear probe (``configs/linprobe/vit_tiny_p4_28.yaml``, MAE protocol), on the test split.
Prints one JSON line per row, then a Markdown table; writes both to ``--out-root``. Finished
pretraining runs are reused (``train.resume``).

    python benchmarks/mim_bloodmnist.py --data ../shared/datasets/bloodmnist.npz --epochs 8 --out-root runs/mim_bench
    # a quick end-to-end check
    python benchmarks/mim_bloodmnist.py --max-train 256 --max-eval 128 --epochs 1 --out-root /tmp/mim_check

``--speed`` measures train-step images/s of the four models alternately in one process (random
28-px images, forward + backward + AdamW, at ``--precision``), so all see the same machine load:

    python benchmarks/mim_bloodmnist.py --speed --batch-size 256 --steps 6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cli_runs import REPO, alternating_step_speed, knn, linprobe, run, subset_npz

METHODS = {  # label: (config, preset)
    "MAE ViT-Ti/4": ("configs/mae/vit_tiny_p4_28.yaml", "mae_vit_tiny_patch4"),
    "SimMIM ViT-Ti/4": ("configs/simmim/vit_tiny_p4_28.yaml", "simmim_vit_tiny_patch4"),
    "SimMIM Swin": ("configs/simmim/swin_tiny_28.yaml", "simmim_swin_tiny_28"),
    "DDMIM Swin": ("configs/ddmim/swin_tiny_28.yaml", "ddmim_swin_tiny_28"),
}
SPEED_OVERRIDES = {"mae_vit_tiny_patch4": {"norm_pix_loss": True}}


def write_untrained(config: str, overrides: list[str], path: Path) -> None:
    """The model ``mimkit pretrain`` would start from (same seed and model config), as a mimkit checkpoint."""
    import torch

    from mimkit.checkpoint import save_atomic
    from mimkit.config import load_config
    from mimkit.engine.pretrain_data import prepare_data
    from mimkit.engine.sampling import init_seed
    from mimkit.registry import create_model

    cfg = load_config(REPO / config, overrides)
    _, model_config, stats = prepare_data(cfg, say=lambda *_: None)
    torch.manual_seed(init_seed(cfg.train.seed))
    model = create_model(model_config["name"], **{k: v for k, v in model_config.items() if k != "name"})
    save_atomic({"format": "mimkit", "model_config": model_config, "model": model.state_dict(), "data_stats": stats,
                 "task": "pretrain", "epoch": 0}, path)


def evaluate(ckpt: Path, data: str, tag: str, run_dir: Path, fraction: float) -> dict:
    row = knn(ckpt, data, None, run_dir / f"knn_{tag}.json")
    row.update(linprobe(ckpt, data, None, run_dir / f"linprobe_{tag}", fraction))
    return row


def benchmark_method(label: str, data: str, root: Path, shared: list[str], fraction: float) -> list[dict]:
    config, _ = METHODS[label]
    run_dir = root / label.replace(" ", "_").replace("/", "")
    overrides = [f"data.path={data}", f"output_dir={run_dir}", *shared]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_untrained(config, overrides, run_dir / "untrained.pt")
    untrained = {"method": label, "pretraining": "none (untrained)",
                 **evaluate(run_dir / "untrained.pt", data, "untrained", run_dir, fraction)}
    print(json.dumps(untrained), flush=True)
    t0 = time.perf_counter()
    proc = run(["pretrain", "--config", config, *overrides])
    if proc.returncode != 0:
        raise SystemExit(f"{label}: pretraining failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    trained = {"method": label, "pretraining": f"{summary.get('final_epoch')} epochs",
               "pretrain_wall_s": round(time.perf_counter() - t0, 1),
               "pretrain_images_per_s": round(summary["images_per_s"], 1), "final_loss": summary.get("final_loss"),
               **evaluate(run_dir / "last.pt", data, "trained", run_dir, fraction)}
    print(json.dumps(trained), flush=True)
    return [trained, untrained]


def table(rows: list[dict], fraction: float) -> str:
    lines = [f"| method | pretraining | k-NN top-1 (k=20) | linear probe, {fraction:.0%} labels | wall time | images/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        k = f"{r['knn_top1_k20']:.2f} %" if "knn_top1_k20" in r else f"n/a ({r.get('knn_error')})"
        lp = f"{r['linprobe_top1']:.2f} %" if "linprobe_top1" in r else f"n/a ({r.get('linprobe_error')})"
        wall = f"{r['pretrain_wall_s'] / 60:.1f} min" if "pretrain_wall_s" in r else ""
        ips = f"{r['pretrain_images_per_s']:.0f}" if "pretrain_images_per_s" in r else ""
        lines.append(f"| {r['method']} | {r['pretraining']} | {k} | {lp} | {wall} | {ips} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "bloodmnist.npz"))
    p.add_argument("--out-root", default="runs/mim_bench")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--epochs", type=int, default=8, help="pretraining epochs of every method")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="lr warmup of every method")
    p.add_argument("--label-fraction", type=float, default=0.01)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="autocast precision of every run")
    p.add_argument("--max-train", type=int, default=None, help="pretrain on this many random train images (checks)")
    p.add_argument("--max-eval", type=int, default=None, help="with --max-train: val/test images kept")
    p.add_argument("--speed", action="store_true", help="only measure the train-step speed of the four models")
    p.add_argument("--batch-size", type=int, default=256, help="--speed: batch size")
    p.add_argument("--steps", type=int, default=6, help="--speed: timed steps per model (after 2 warm-up steps)")
    p.add_argument("overrides", nargs="*", help="key=value for every pretraining run, after the shared budget")
    args = p.parse_args()
    if args.speed:
        models = {label: (preset, SPEED_OVERRIDES.get(preset, {})) for label, (_, preset) in METHODS.items()}
        print(json.dumps(alternating_step_speed(models, args.batch_size, args.steps, 2, args.precision)), flush=True)
        return
    root = Path(args.out_root)
    data = args.data
    if args.max_train:
        data = subset_npz(data, root / "data_subset.npz", args.max_train, args.max_eval or args.max_train)
    shared = [f"train.epochs={args.epochs}", f"train.warmup_epochs={args.warmup_epochs}", "train.batch_size=256",
              f"train.precision={args.precision}", "train.progress=false", *args.overrides]
    rows = []
    for label in args.methods.split(","):
        rows += benchmark_method(label, data, root, shared, args.label_fraction)
    text = table(rows, args.label_fraction)
    print(text)
    (root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
