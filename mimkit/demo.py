"""``mimkit demo``: a few minutes of MAE pretraining on a dataset that needs no download.

Pretrains MAE ViT-Ti/4 at 28 px on scikit-learn's digits (or any ``--data``), reports weighted
k-NN accuracy of the pretrained encoder against the same network untrained (same seed), and
writes the reconstruction figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mimkit.config import check_output_dir, load_config
from mimkit.data import load_dataset
from mimkit.engine.trainer import pretrain
from mimkit.eval.knn import evaluate_encoder_knn
from mimkit.loading import build_from_checkpoint
from mimkit.registry import create_model
from mimkit.viz.reconstruction import draw_reconstructions


def run_demo(out: str | Path = "runs/demo", data: str = "digits", epochs: int | None = None) -> dict:
    out = Path(out)
    check_output_dir(out, "--out")
    if epochs is None:  # 0 is an error for the config check below, not "the default"
        epochs = 30 if data == "digits" else 5
    overrides = [
        f"output_dir={out}", f"data.path={data}", f"train.epochs={epochs}", f"train.warmup_epochs={max(1, epochs // 10)}",
        "train.batch_size=128", "train.blr=1.5e-3", "train.precision=bf16", "train.resume=false", "train.log_every=5",
    ]
    config = Path(__file__).resolve().parent.parent / "configs" / "mae" / "vit_tiny_p4_28.yaml"
    cfg = load_config(config if config.is_file() else None, overrides)
    if not config.is_file():  # installed without the repository's configs/: same recipe inline
        cfg = load_config(None, ["model.name=mae_vit_tiny_patch4", "model.norm_pix_loss=true", *overrides])
    print(f"[demo] pretraining MAE ViT-Ti/4 on {data} for {epochs} epochs -> {out}", flush=True)
    t0 = time.perf_counter()
    summary = pretrain(cfg)
    train_time = time.perf_counter() - t0

    model, ckpt = build_from_checkpoint(out / "last.pt")
    stats = ckpt["data_stats"]
    torch.manual_seed(cfg.train.seed)  # the same initialisation the run started from
    untrained = create_model(**ckpt["model_config"])
    knn = {}
    for name, encoder in (("untrained", untrained.encoder), ("pretrained", model.encoder)):
        result = evaluate_encoder_knn(encoder, data, stats, k=(20,), temperature=0.07)
        knn[name] = result["accuracy"]["20"]["top1"]

    figure = draw_reconstructions(model, load_dataset(data, "test"), stats["mean"], stats["std"],
                                  out / "reconstruction.png", title=f"MAE ViT-Ti/4 after {epochs} epochs on {data}")
    report = {"data": data, "epochs": epochs, "pretrain_time_s": round(train_time, 1),
              "knn_top1_k20_untrained": knn["untrained"], "knn_top1_k20_pretrained": knn["pretrained"],
              "final_loss": summary.get("final_loss"), "figure": str(figure)}
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    print("\n[demo] weighted k-NN (k=20, T=0.07, [CLS]) test top-1")
    print(f"  untrained network : {knn['untrained']:6.2f} %")
    print(f"  MAE pretrained    : {knn['pretrained']:6.2f} %   ({epochs} epochs, {train_time / 60:.1f} min)")
    print(f"[demo] reconstruction figure: {figure}")
    return report
