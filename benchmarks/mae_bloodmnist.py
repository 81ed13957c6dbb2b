"""Quality benchmark: MAE pretraining on a MedMNIST file, then weighted k-NN of the encoder.

Runs ``mimkit pretrain`` with the given config and overrides, then weighted k-NN (k=20,
T=0.07, [CLS] after the final norm, DINO protocol) of the pretrained encoder and of the same
network untrained (same seed). Prints one JSON object with accuracies and wall times.

    python benchmarks/mae_bloodmnist.py --config configs/mae/vit_tiny_p4_28.yaml \
        data.path=../shared/datasets/bloodmnist.npz output_dir=runs/mae_blood
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mae/vit_tiny_p4_28.yaml")
    p.add_argument("--skip-untrained", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from mimkit.loading import build_from_checkpoint
    from mimkit.config import load_config
    from mimkit.engine.trainer import pretrain
    from mimkit.eval.knn import evaluate_encoder_knn
    from mimkit.registry import create_model

    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    summary = pretrain(cfg)
    pretrain_s = time.perf_counter() - t0
    model, ckpt = build_from_checkpoint(f"{cfg.output_dir}/last.pt")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t1 = time.perf_counter()
    knn = evaluate_encoder_knn(model.encoder, cfg.data.path, ckpt["data_stats"], k=(10, 20, 100, 200), device=device)
    knn_s = time.perf_counter() - t1
    result = {
        "config": args.config, "overrides": args.overrides, "data": cfg.data.path, "epochs": cfg.train.epochs,
        "precision": cfg.train.precision, "batch_size": cfg.train.batch_size, "pretrain_wall_s": round(pretrain_s, 1),
        "pretrain_images_per_s": round(summary["images_per_s"], 1), "final_loss": summary.get("final_loss"),
        "knn_wall_s": round(knn_s, 1), "knn_top1": {k: v["top1"] for k, v in knn["accuracy"].items()},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ""),
    }
    if not args.skip_untrained:
        torch.manual_seed(cfg.train.seed)
        untrained = create_model(**ckpt["model_config"])
        base = evaluate_encoder_knn(untrained.encoder, cfg.data.path, ckpt["data_stats"], k=(20,), device=device)
        result["untrained_knn_top1_k20"] = base["accuracy"]["20"]["top1"]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
