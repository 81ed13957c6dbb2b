"""The ``mimkit`` command: one entry point, sub-commands, nothing else.

    mimkit pretrain  --config configs/mae/vit_tiny_p4_28.yaml data.path=bloodmnist.npz
    mimkit knn       --checkpoint runs/mae/last.pt --data bloodmnist.npz
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


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="mimkit checkpoint, or official MAE / timm weights with --model")
    p.add_argument("--data", required=True, help="image folder, MedMNIST .npz, medmnist:NAME or digits")
    p.add_argument("--model", default=None, help="preset name for checkpoints not written by mimkit")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read old pickled checkpoints (can run code from the file: only for trusted files)")
    p.add_argument("--device", default="auto")


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
    from mimkit.checkpoint import load_encoder
    from mimkit.eval.knn import evaluate_encoder_knn

    encoder, stats = load_encoder(args.checkpoint, args.model, args.allow_pickle)
    result = evaluate_encoder_knn(
        encoder, args.data, stats, k=args.k, temperature=args.temperature, pool=args.pool,
        final_norm=not args.no_final_norm, train_split=args.train_split, test_split=args.test_split,
        batch_size=args.batch_size, device=_device(args.device),
    )
    result["checkpoint"] = args.checkpoint
    print(f"weighted k-NN ({args.pool} token, T={args.temperature}) on {args.data}: "
          f"{result['num_train']} train / {result['num_test']} {args.test_split} images, {result['num_classes']} classes")
    print(f"{'k':>6} {'top-1 %':>8}" + (f" {'top-5 %':>8}" if result["num_classes"] > 5 else ""))
    for k, acc in result["accuracy"].items():
        print(f"{k:>6} {acc['top1']:8.2f}" + (f" {acc['top5']:8.2f}" if "top5" in acc else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def cmd_visualize(args) -> int:
    from mimkit.checkpoint import build_from_checkpoint, load_file
    from mimkit.data import compute_channel_stats, load_dataset
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
    if not isinstance(model, MAE):
        raise CheckpointError(f"Checkpoint {args.checkpoint} has no MAE decoder, so it cannot reconstruct images.")
    dataset = load_dataset(args.data, args.split)
    if stats is None:
        mean, std = compute_channel_stats(dataset)
        stats = {"mean": mean, "std": std}
    title = f"{Path(args.checkpoint).name}: mask ratio {model.mask_ratio}"
    out = draw_reconstructions(model, dataset, stats["mean"], stats["std"], args.out,
                               num_images=args.num_images, seed=args.seed, title=title)
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
    p.set_defaults(func=cmd_knn)

    p = sub.add_parser("visualize", help="figures from a checkpoint (reconstruction)")
    _add_checkpoint_args(p)
    p.add_argument("--what", default="reconstruction", choices=["reconstruction"],
                   help="figure to draw (masks, attention and rollout arrive with DAMA and iBOT)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--split", default="test")
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--seed", type=int, default=2)
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
