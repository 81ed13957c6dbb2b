"""The ``mimkit`` command: one entry point, sub-commands, nothing else.

    mimkit pretrain  --config configs/mae/vit_tiny_p4_28.yaml data.path=bloodmnist.npz
    mimkit knn       --checkpoint runs/mae/last.pt --data bloodmnist.npz
    mimkit finetune  --checkpoint runs/mae/last.pt --data bloodmnist.npz --config configs/finetune/vit_tiny_p4_28.yaml
    mimkit linprobe  --checkpoint runs/mae/last.pt --data bloodmnist.npz data.label_fraction=0.01
    mimkit visualize --what reconstruction --checkpoint runs/mae/last.pt --data bloodmnist.npz --out rec.png
    mimkit demo
    mimkit models
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mimkit.errors import MimkitError


def _add_checkpoint_args(p: argparse.ArgumentParser,
                         encoder_help: str = "which encoder of the checkpoint (e.g. student1, teacher)") -> None:
    p.add_argument("--checkpoint", required=True,
                   help="mimkit checkpoint, or official MAE / timm ViT / DAMA / iBOT-DINO weights (format detected)")
    p.add_argument("--data", required=True, help="image folder, MedMNIST .npz, medmnist:NAME or digits")
    p.add_argument("--model", default=None,
                   help="preset name for checkpoints not written by mimkit (default: ViT size read off the weights)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read old pickled checkpoints (can run code from the file: only for trusted files)")
    p.add_argument("--device", default="auto")
    p.add_argument("--encoder", default=None, help=encoder_help)


def _device(name: str) -> str:
    from mimkit.engine.distributed import resolve_device

    return str(resolve_device(name))


def cmd_pretrain(args) -> int:
    from mimkit.config import load_config
    from mimkit.engine.trainer import pretrain

    cfg = load_config(args.config, args.overrides)
    summary = pretrain(cfg)
    print(json.dumps(summary))
    return 0


def cmd_knn(args) -> int:
    from mimkit.loading import load_encoder
    from mimkit.config import load_config
    from mimkit.engine.distributed import cleanup, init_distributed
    from mimkit.eval.knn import evaluate_encoder_knn

    # key=value overrides: data.labels_per_class / data.label_fraction / data.label_seed, output_dir.
    cfg = load_config(None, [*args.overrides, f"data.path={args.data}"])
    di, device = init_distributed(args.device)  # under torchrun: sharded features, all-gathered bank
    try:
        encoder, stats = load_encoder(args.checkpoint, args.model, args.allow_pickle, encoder=args.encoder)
        result = evaluate_encoder_knn(
            encoder, args.data, stats, k=args.k, temperature=args.temperature, pool=args.pool,
            final_norm=not args.no_final_norm, train_split=args.train_split, test_split=args.test_split,
            batch_size=args.batch_size, device=str(device), data_cfg=cfg.data,
        )
    finally:
        cleanup()
    if not di.is_main:
        return 0
    result["checkpoint"] = args.checkpoint
    print(f"weighted k-NN ({args.pool} token, T={args.temperature}) on {args.data}: "
          f"{result['num_train']} train / {result['num_test']} {args.test_split} images, {result['num_classes']} classes")
    print(f"{'k':>6} {'top-1 %':>8}" + (f" {'top-5 %':>8}" if result["num_classes"] > 5 else ""))
    for k, acc in result["accuracy"].items():
        print(f"{k:>6} {acc['top1']:8.2f}" + (f" {acc['top5']:8.2f}" if "top5" in acc else ""))
    outputs = [Path(args.out)] if args.out else []
    if any(o.startswith("output_dir=") for o in args.overrides):
        outputs.append(Path(cfg.output_dir) / "knn_metrics.json")
    for out in outputs:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return 0


def _eval_overrides(args, section: str) -> list[str]:
    """Command-line flags of linprobe/finetune as config overrides (``section`` holds the encoder)."""
    overrides = [*args.overrides, f"data.path={args.data}"]
    if args.encoder:
        overrides.append(f"{section}.encoder={args.encoder}")
    if args.device != "auto":
        overrides.append(f"train.device={args.device}")
    return overrides


def _print_test_metrics(split: str, result: dict, note: str = "") -> None:
    m = result["metrics"]
    print(f"{split}: top-1 {m['top1']:.2f} %" + (f", top-5 {m['top5']:.2f} %" if "top5" in m else "")
          + f", AUC {m['auc']:.4f} ({m['num_images']} images{note}); metrics in {result['metrics_json']}")


def cmd_linprobe(args) -> int:
    from mimkit.config import load_config
    from mimkit.eval.linprobe import DINO_TRAIN, LINPROBE_DEFAULTS, run_linprobe

    overrides = _eval_overrides(args, "linprobe")
    cfg = load_config(args.config, overrides, defaults=LINPROBE_DEFAULTS)
    if cfg.linprobe.protocol == "dino":  # DINO's own defaults (SGD, no warmup) under the file and overrides
        dino = {**LINPROBE_DEFAULTS, "train": {**LINPROBE_DEFAULTS["train"], **DINO_TRAIN}}
        cfg = load_config(args.config, overrides, defaults=dino)
    result = run_linprobe(cfg, args.checkpoint, args.model, args.allow_pickle)
    if result is None:
        return 0
    _print_test_metrics(cfg.data.test_split, result, f", {result['reported']}.pt")
    return 0


def cmd_finetune(args) -> int:
    from mimkit.config import load_config
    from mimkit.eval.finetune import FINETUNE_DEFAULTS, run_finetune

    overrides = _eval_overrides(args, "finetune")
    cfg = load_config(args.config, overrides, defaults=FINETUNE_DEFAULTS)
    if args.eval:
        from mimkit.eval.finetune import evaluate_finetuned_checkpoint

        result = evaluate_finetuned_checkpoint(cfg, args.checkpoint, args.allow_pickle)
    else:
        result = run_finetune(cfg, args.checkpoint, args.model, args.allow_pickle)
    if result is None:  # a non-main torchrun process
        return 0
    _print_test_metrics(cfg.data.test_split, result)
    return 0


def cmd_visualize(args) -> int:
    from mimkit.checkpoint import load_file
    from mimkit.loading import build_from_checkpoint
    from mimkit.data import load_dataset, stats_for
    from mimkit.errors import CheckpointError
    from mimkit.methods.mae import MAE
    from mimkit.viz.reconstruction import draw_reconstructions

    if args.model:
        from mimkit.checkpoint import extract_state_dict, load_state_dict_checked
        from mimkit.registry import create_model

        model = create_model(args.model)
        load_state_dict_checked(model, extract_state_dict(load_file(args.checkpoint, args.allow_pickle)),
                                f"Checkpoint {args.checkpoint}")
        stats = None
    else:
        model, obj = build_from_checkpoint(args.checkpoint, args.allow_pickle)
        stats = obj.get("data_stats")
    if args.what == "masks":
        return _visualize_dama_masks(args, model, stats)
    if args.what in ("attention", "rollout"):
        return _visualize_attention(args, model, stats)
    if not isinstance(model, MAE):
        raise CheckpointError(f"Checkpoint {args.checkpoint} has no MAE decoder, so it cannot reconstruct images.")
    dataset = load_dataset(args.data, args.split)
    stats = stats_for(dataset, stats)
    title = f"{Path(args.checkpoint).name}: mask ratio {model.mask_ratio}"
    out = draw_reconstructions(model, dataset, stats["mean"], stats["std"], args.out,
                               num_images=args.num_images, seed=args.seed, title=title)
    print(f"wrote {out}")
    return 0


def _visualize_dama_masks(args, model, stats) -> int:
    """``visualize --what masks``: student 1's mask, its per-patch error and student 2's mask (DAMA)."""
    from mimkit.data import load_dataset, stats_for
    from mimkit.errors import CheckpointError
    from mimkit.methods.dama import DAMA
    from mimkit.viz.masks import draw_dama_masks

    if not isinstance(model, DAMA):
        raise CheckpointError(f"Checkpoint {args.checkpoint} is not a DAMA model, so it has no adaptive masks: "
                              f"pass a checkpoint trained with a dama_* preset.")
    dataset = load_dataset(args.data, args.split)
    if dataset.num_channels != model.student1.in_chans:
        raise CheckpointError(f"Checkpoint {args.checkpoint} was trained on {model.student1.in_chans}-channel images but "
                              f"{args.data} has {dataset.num_channels} channels: pass the data it was trained on.")
    stats = stats_for(dataset, stats)
    title = (f"{Path(args.checkpoint).name}: DAMA student 2 mask = {model.student2_mask}, mask ratio "
             f"{model.mask_ratio}, overlap {model.mask_overlap_ratio}")
    out = draw_dama_masks(model, dataset, stats["mean"], stats["std"], args.out,
                          num_images=args.num_images, seed=args.seed, title=title)
    print(f"wrote {out}")
    return 0


def _visualize_attention(args, model, stats) -> int:
    """``visualize --what attention|rollout``: [CLS] attention or rollout, and the AttMask masks it gives."""
    from mimkit.data import load_dataset, stats_for
    from mimkit.errors import CheckpointError, ConfigError
    from mimkit.methods.base import select_encoder
    from mimkit.viz.attention import draw_attention

    encoder = select_encoder(model, args.encoder)
    dataset = load_dataset(args.data, args.split)
    if dataset.num_channels != encoder.in_chans:
        raise CheckpointError(f"Checkpoint {args.checkpoint} was trained on {encoder.in_chans}-channel images but "
                              f"{args.data} has {dataset.num_channels} channels: pass the data it was trained on.")
    if not -encoder.depth <= args.layer < encoder.depth:
        raise ConfigError(f"--layer {args.layer} does not exist: the encoder has blocks 0 to {encoder.depth - 1}.")
    if not 0 <= args.discard_ratio < 1:
        raise ConfigError(f"--discard-ratio must lie in [0, 1), got {args.discard_ratio}.")
    stats = stats_for(dataset, stats)
    encoder = encoder.to(_device(args.device))
    out = draw_attention(encoder, dataset, stats["mean"], stats["std"], args.out, args.what, layer=args.layer,
                         head_fusion=args.head_fusion, discard_ratio=args.discard_ratio,
                         mask_ratio=args.mask_ratio, num_images=args.num_images, seed=args.seed,
                         title=f"{Path(args.checkpoint).name}: {args.what}")
    print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from mimkit.demo import run_demo

    run_demo(args.out, data=args.data, epochs=args.epochs)
    return 0


def cmd_models(args) -> int:
    from mimkit.registry import PRESETS

    for name in sorted(PRESETS):
        print(f"{name:24s} {PRESETS[name].description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimkit", description="Masked image modeling: pretrain, evaluate, visualise.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a model (any method) from a YAML config plus key=value overrides")
    p.add_argument("--config", default=None, help="YAML file (see configs/); defaults apply when omitted")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. data.path=bloodmnist.npz train.epochs=40")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("knn", help="weighted k-NN accuracy of frozen features (DINO protocol)")
    _add_checkpoint_args(p)
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--pool", choices=["cls", "mean"], default="cls", help="[CLS] token or mean of patch tokens")
    p.add_argument("--no-final-norm", action="store_true", help="use the last block's output before the final norm")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*",
                   help="key=value: data.labels_per_class=N, data.label_fraction=F, data.label_seed=S, "
                        "output_dir=DIR (writes DIR/knn_metrics.json)")
    p.set_defaults(func=cmd_knn)

    p = sub.add_parser("linprobe", help="linear probe of frozen features (MAE: BN + linear, LARS; DINO: last-n [CLS], SGD)")
    _add_checkpoint_args(p)
    p.add_argument("--config", default=None, help="YAML file (see configs/linprobe/); the MAE protocol applies when omitted")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. linprobe.protocol=dino data.labels_per_class=10")
    p.set_defaults(func=cmd_linprobe)

    p = sub.add_parser("finetune", help="fine-tune a pretrained encoder end to end (MAE recipe); --eval scores a fine-tuned checkpoint")
    _add_checkpoint_args(p)
    p.add_argument("--config", default=None, help="YAML file (see configs/finetune/); the MAE recipe applies when omitted")
    p.add_argument("--eval", action="store_true", help="only evaluate a fine-tuned checkpoint on data.test_split")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.epochs=20 data.label_fraction=0.01")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("visualize", help="figures from a checkpoint (reconstruction)")
    _add_checkpoint_args(p, "attention/rollout: which encoder (iBOT: teacher (default) or student)")
    p.add_argument("--what", default="reconstruction", choices=["reconstruction", "masks", "attention", "rollout"],
                   help="reconstruction (MAE), masks (DAMA), attention / rollout ([CLS] attention or rollout of any "
                        "ViT encoder, with the AttMask masks it gives)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--split", default="test")
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--layer", type=int, default=-1, help="attention: block whose [CLS] attention is shown (default: last)")
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean", help="attention/rollout: how heads are fused")
    p.add_argument("--discard-ratio", type=float, default=0.0,
                   help="attention/rollout: zero this fraction of the weakest attention entries per block (vit-explain: 0.9)")
    p.add_argument("--mask-ratio", type=float, default=0.4, help="attention/rollout: masking ratio of the AttMask columns")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("demo", help="pretrain briefly on an embedded dataset, compare k-NN with the untrained net, draw reconstructions")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data", default="digits", help="dataset (default: scikit-learn digits, no download)")
    p.add_argument("--epochs", type=int, default=None, help="default: a few minutes on a 2-core CPU")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="list model presets")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MimkitError as exc:
        print(f"mimkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mimkit {args.command}: interrupted; the last completed checkpoint is kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
