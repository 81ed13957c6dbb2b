"""Quality benchmark: iBOT with five mask generators at one shared budget, then weighted k-NN.

For each variant (random, block, AttMask-high, AttMask-hint, rollout: AttMask-high from the
rollout over the last third of the teacher's blocks) it runs ``mimkit pretrain`` with
``configs/ibot/vit_tiny_p4_28.yaml`` plus the shared overrides, then the weighted k-NN of the
teacher (k=20, T=0.07, [CLS] after the final norm, DINO protocol). Optionally the k-NN of an
MAE checkpoint is measured with the same code for the baseline row. Prints one JSON object
per variant as it finishes, then a Markdown table. Runs resume (``train.resume``), so a killed
benchmark continues where it stopped; finished variants are not retrained.

    python benchmarks/ibot_bloodmnist.py --epochs 10 --mae-checkpoint runs/mae_blood_cpu2/last.pt \
        data.path=../shared/datasets/bloodmnist.npz
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

VARIANTS = {
    "random": ["model.mask_strategy=random"],
    "block": ["model.mask_strategy=block"],
    "attmask_high": ["model.mask_strategy=attmask_high", "model.mask_scores=raw"],
    "attmask_hint": ["model.mask_strategy=attmask_hint", "model.mask_scores=raw"],
    "rollout_last": ["model.mask_strategy=attmask_high", "model.mask_scores=rollout_last"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ibot/vit_tiny_p4_28.yaml")
    p.add_argument("--epochs", type=int, default=10, help="epochs of every variant (also the momentum schedule)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out-root", default="runs/ibot_blood")
    p.add_argument("--mae-checkpoint", default=None, help="MAE checkpoint for the baseline row (same k-NN code)")
    p.add_argument("--untrained", action="store_true", help="add a row for the teacher at initialisation (same seed)")
    p.add_argument("overrides", nargs="*", help="shared key=value overrides, e.g. data.path=... train.batch_size=128")
    args = p.parse_args()

    from mimkit.loading import load_encoder
    from mimkit.config import load_config
    from mimkit.engine.trainer import pretrain
    from mimkit.eval.knn import evaluate_encoder_knn

    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
               + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ""))
    rows = []
    for name in args.variants:
        out = Path(args.out_root) / name
        overrides = [*args.overrides, *VARIANTS[name], f"train.epochs={args.epochs}",
                     f"model.total_epochs={args.epochs}", f"output_dir={out}"]
        cfg = load_config(args.config, overrides)
        summary_path = out / "summary.json"
        done = summary_path.is_file() and json.loads(summary_path.read_text()).get("final_epoch") == args.epochs
        t0 = time.perf_counter()
        summary = json.loads(summary_path.read_text()) if done else pretrain(cfg)
        encoder, stats = load_encoder(out / "last.pt")  # the teacher
        t1 = time.perf_counter()
        knn = evaluate_encoder_knn(encoder, cfg.data.path, stats, k=(10, 20), device=device)
        row = {
            "variant": name, "overrides": overrides, "epochs": args.epochs, "batch_size": cfg.train.batch_size,
            "crops": f"2x{cfg.model.get('img_size', 28)} + {cfg.model.get('num_local_crops')}x{cfg.model.get('local_crop_size')}",
            "pretrain_wall_s": round(summary["wall_time_s"], 1), "pretrain_images_per_s": round(summary["images_per_s"], 1),
            "final_loss": summary.get("final_loss"), "knn_top1": {k: v["top1"] for k, v in knn["accuracy"].items()},
            "knn_wall_s": round(time.perf_counter() - t1, 1), "reused": done,
            "session_s": round(time.perf_counter() - t0, 1), "machine": machine,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "knn_result.json").write_text(json.dumps(row, indent=2))

    mae_row = None
    if args.mae_checkpoint:
        encoder, stats = load_encoder(args.mae_checkpoint)
        data = load_config(args.config, args.overrides).data.path
        knn = evaluate_encoder_knn(encoder, data, stats, k=(10, 20), device=device)
        mae_row = {"variant": "MAE baseline", "checkpoint": args.mae_checkpoint,
                   "knn_top1": {k: v["top1"] for k, v in knn["accuracy"].items()}}
        print(json.dumps(mae_row), flush=True)

    untrained_row = None
    if args.untrained:
        from mimkit.engine.pretrain_data import prepare_data
        from mimkit.registry import create_model

        cfg = load_config(args.config, args.overrides)
        _, model_config, stats = prepare_data(cfg)
        torch.manual_seed(cfg.train.seed)  # the seed pretraining starts from, so this is epoch 0 of every variant
        model = create_model(**model_config)
        knn = evaluate_encoder_knn(model.teacher, cfg.data.path, stats, k=(10, 20), device=device)
        untrained_row = {"variant": "untrained teacher (epoch 0)",
                         "knn_top1": {k: v["top1"] for k, v in knn["accuracy"].items()}}
        print(json.dumps(untrained_row), flush=True)

    print("\n| method / mask | epochs | crops | wall time | images/s | k-NN top-1 (k=20) | k=10 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| iBOT, {r['variant']} | {r['epochs']} | {r['crops']} | {r['pretrain_wall_s'] / 60:.1f} min | "
              f"{r['pretrain_images_per_s']:.0f} | {r['knn_top1']['20']:.2f} % | {r['knn_top1']['10']:.2f} % |")
    if untrained_row:
        print(f"| iBOT teacher, untrained | 0 | | | | {untrained_row['knn_top1']['20']:.2f} % | "
              f"{untrained_row['knn_top1']['10']:.2f} % |")
    if mae_row:
        print(f"| MAE ({mae_row['checkpoint']}) | | | | | {mae_row['knn_top1']['20']:.2f} % | "
              f"{mae_row['knn_top1']['10']:.2f} % |")


if __name__ == "__main__":
    main()
