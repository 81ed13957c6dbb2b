"""The ``mimkit`` command: one entry point, sub-commands, nothing else.

    mimkit pretrain  --config configs/mae/vit_tiny_p4_28.yaml data.path=bloodmnist.npz
    mimkit knn       --checkpoint runs/mae/last.pt --data bloodmnist.npz --k 10 20 data.label_fraction=0.01
    mimkit finetune  --checkpoint runs/mae/last.pt --data bloodmnist.npz --config configs/finetune/vit_tiny_p4_28.yaml
    mimkit linprobe  --checkpoint runs/mae/last.pt --data bloodmnist.npz data.label_fraction=0.01
    mimkit visualize --what reconstruction --checkpoint runs/mae/last.pt --data bloodmnist.npz --out rec.png
    mimkit config show train.epochs | train | model | --all
    mimkit demo
    mimkit models

Every problem a user can fix ends in one line on stderr (``mimkit CMD: error: ...``) and exit
status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from mimkit.checkpoint import extract_state_dict, load_file, load_state_dict_checked, write_text_atomic
from mimkit.config import Config, check_output_dir, check_output_file, describe_keys, load_config, validate_knn
from mimkit.data import load_dataset, stats_for
from mimkit.data.sources import check_patch_fits
from mimkit.demo import run_demo
from mimkit.engine.distributed import cleanup, init_distributed, resolve_device
from mimkit.engine.trainer import pretrain
from mimkit.errors import CheckpointError, ConfigError, DataError, MimkitError
from mimkit.eval.finetune import FINETUNE_DEFAULTS, evaluate_finetuned_checkpoint, run_finetune
from mimkit.eval.knn import evaluate_encoder_knn
from mimkit.eval.linprobe import DINO_TRAIN, LINPROBE_DEFAULTS, run_linprobe
from mimkit.loading import build_from_checkpoint, load_encoder
from mimkit.methods.base import select_encoder
from mimkit.methods.dama import DAMA
from mimkit.methods.mae import MAE
from mimkit.registry import PRESETS, create_model
from mimkit.viz import check_figure_path
from mimkit.viz.attention import draw_attention
from mimkit.viz.masks import draw_dama_masks, draw_pixel_masks
from mimkit.viz.reconstruction import draw_reconstructions, reconstructs_pixels

CONFIG_KEYS_HINT = ("List every config key with its type, default and meaning: mimkit config show --all; one "
                    "section: mimkit config show train; one key: mimkit config show train.epochs; a model preset's "
                    "arguments: mimkit config show model --model NAME.")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the problem, then where the help is), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help.\n")


class _KValues(argparse.Action):
    """``--k 10 20``: the whole numbers up to the first ``key=value`` word.

    ``nargs="+"`` alone would swallow the overrides that follow (``--k 10 20 data.label_fraction=0.01``),
    so the words from the first ``key=value`` on are handed back as overrides (``k_overrides``).
    """

    def __call__(self, parser, namespace, values, option_string=None):
        ks = list(itertools.takewhile(lambda v: "=" not in v, values))
        try:
            setattr(namespace, self.dest, [int(v) for v in ks])
        except ValueError:
            raise argparse.ArgumentError(self, f"takes whole numbers such as --k 10 20, got {' '.join(ks)!r}") from None
        namespace.k_overrides = values[len(ks):]


def _positive_int(text: str) -> int:
    """argparse type of counts (--batch-size, --num-images, --epochs): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _check_run(cfg) -> None:
    """What a training run needs, checked before it starts: a writable output_dir and a device this machine has."""
    check_output_dir(cfg.output_dir)
    resolve_device(cfg.train.device)


def cmd_pretrain(args) -> int:
    cfg = load_config(args.config, args.overrides)
    _check_run(cfg)
    print(json.dumps(pretrain(cfg)))
    return 0


def _knn_outputs(args, overrides: list[str], output_dir: str) -> list[Path]:
    """Where the k-NN result goes (``--out``, ``output_dir=DIR`` -> DIR/knn_metrics.json), checked before any work."""
    outputs = []
    if args.out:
        check_output_file(args.out, "--out")
        outputs.append(Path(args.out))
    if any(o.startswith("output_dir=") for o in overrides):
        check_output_dir(output_dir)
        outputs.append(Path(output_dir) / "knn_metrics.json")
    return outputs


def _print_knn(args, result: dict) -> None:
    print(f"weighted k-NN ({result['pool']} token, T={args.temperature}) on {args.data}: "
          f"{result['num_train']} train / {result['num_test']} {args.test_split} images, {result['num_classes']} classes")
    print(f"{'k':>6} {'top-1 %':>8}" + (f" {'top-5 %':>8}" if result["num_classes"] > 5 else ""))
    for k, acc in result["accuracy"].items():
        print(f"{k:>6} {acc['top1']:8.2f}" + (f" {acc['top5']:8.2f}" if "top5" in acc else ""))


def cmd_knn(args) -> int:
    validate_knn(args.k, args.temperature)
    # key=value overrides: data.labels_per_class / data.label_fraction / data.label_seed, output_dir.
    overrides = [*args.k_overrides, *args.overrides]
    cfg = load_config(None, [*overrides, f"data.path={args.data}"])
    outputs = _knn_outputs(args, overrides, cfg.output_dir)
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
    _print_knn(args, result)
    for out in outputs:  # atomic: a killed run leaves the previous result, never half of a new one
        write_text_atomic(json.dumps(result, indent=2), out)
    return 0


def _eval_config(args, section: str, defaults: dict):
    """The config of linprobe/finetune: ``defaults`` under the file, the overrides and the command-line
    flags (``section`` holds the encoder); its output_dir is checked before any work."""
    overrides = [*args.overrides, f"data.path={args.data}"]
    if args.encoder:
        overrides.append(f"{section}.encoder={args.encoder}")
    if args.device != "auto":
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.config, overrides, defaults=defaults)
    if section == "linprobe" and cfg.linprobe.protocol == "dino":  # DINO's own defaults under the file and overrides
        dino = {**defaults, "train": {**defaults["train"], **DINO_TRAIN}}
        cfg = load_config(args.config, overrides, defaults=dino)
    _check_run(cfg)
    return cfg


def _print_test_metrics(split: str, result: dict, note: str = "") -> None:
    m = result["metrics"]
    print(f"{split}: top-1 {m['top1']:.2f} %" + (f", top-5 {m['top5']:.2f} %" if "top5" in m else "")
          + f", AUC {m['auc']:.4f} ({m['num_images']} images{note}); metrics in {result['metrics_json']}")


def cmd_linprobe(args) -> int:
    cfg = _eval_config(args, "linprobe", LINPROBE_DEFAULTS)
    result = run_linprobe(cfg, args.checkpoint, args.model, args.allow_pickle)
    if result is None:
        return 0
    _print_test_metrics(cfg.data.test_split, result, f", {result['reported']}.pt")
    return 0


def cmd_finetune(args) -> int:
    cfg = _eval_config(args, "finetune", FINETUNE_DEFAULTS)
    if args.eval:
        result = evaluate_finetuned_checkpoint(cfg, args.checkpoint, args.allow_pickle)
    else:
        result = run_finetune(cfg, args.checkpoint, args.model, args.allow_pickle)
    if result is None:  # a non-main torchrun process
        return 0
    _print_test_metrics(cfg.data.test_split, result)
    return 0


def _check_visualize_args(args) -> None:
    """Everything about ``visualize``'s flags that can be wrong, before a checkpoint is read."""
    check_figure_path(args.out, "--out")
    if not 0 <= args.discard_ratio < 1:
        raise ConfigError(f"--discard-ratio must lie in [0, 1), got {args.discard_ratio}: e.g. --discard-ratio 0.9.")
    if not 0 < args.mask_ratio < 1:
        raise ConfigError(f"--mask-ratio must lie strictly between 0 and 1, got {args.mask_ratio}: e.g. --mask-ratio 0.4.")


def _visualize_model(args):
    """The model to draw and its recorded data statistics (None for weights imported with --model)."""
    if not args.model:
        model, obj = build_from_checkpoint(args.checkpoint, args.allow_pickle)
        return model, obj.get("data_stats")
    model = create_model(args.model)
    load_state_dict_checked(model, extract_state_dict(load_file(args.checkpoint, args.allow_pickle)),
                            f"Checkpoint {args.checkpoint}")
    return model, None


def _visualize_data(args, encoder, stats):
    """The images to draw (checked against ``encoder``: channels, patch size) and their statistics."""
    dataset = load_dataset(args.data, args.split)
    if dataset.num_channels != encoder.in_chans:
        raise DataError(f"Checkpoint {args.checkpoint} was trained on {encoder.in_chans}-channel images but "
                        f"{args.data} has {dataset.num_channels} channels: pass the data it was trained on.")
    check_patch_fits(dataset, encoder.patch_size)
    return dataset, stats_for(dataset, stats)


def cmd_visualize(args) -> int:
    _check_visualize_args(args)
    model, stats = _visualize_model(args)
    if args.what == "masks":
        out = _visualize_masks(args, model, stats)
    elif args.what in ("attention", "rollout"):
        out = _visualize_attention(args, model, stats)
    else:
        out = _visualize_reconstruction(args, model, stats)
    print(f"wrote {out}")
    return 0


def _mask_description(model) -> str:
    """The masking of a figure's title: ratio (MAE, SimMIM, DAMA) or per-token probability (DDMIM)."""
    if hasattr(model, "mask_prob"):
        return f"mask probability {model.mask_prob}"
    cells = f", {model.mask_patch_size}-px mask cells" if hasattr(model, "mask_patch_size") else ""
    return f"mask ratio {model.mask_ratio}{cells}"


def _visualize_reconstruction(args, model, stats) -> Path:
    """``visualize --what reconstruction``: original, masked, reconstruction, reconstruction + visible
    (MAE, or a pixel-space method such as SimMIM and DDMIM)."""
    if not (isinstance(model, MAE) or reconstructs_pixels(model)):
        raise CheckpointError(f"Checkpoint {args.checkpoint} has no pixel decoder, so it cannot reconstruct images: "
                              f"the figure needs an MAE, SimMIM or DDMIM checkpoint (or use --what attention).")
    dataset, stats = _visualize_data(args, model, stats)
    return draw_reconstructions(model, dataset, stats["mean"], stats["std"], args.out, num_images=args.num_images,
                                seed=args.seed, title=f"{Path(args.checkpoint).name}: {_mask_description(model)}")


def _visualize_masks(args, model, stats) -> Path:
    """``visualize --what masks``: DAMA's two students' masks and student 1's error, or the image and
    its mask for a pixel-space method (SimMIM, DDMIM)."""
    if isinstance(model, DAMA):
        return _visualize_dama_masks(args, model, stats)
    if not reconstructs_pixels(model):
        raise CheckpointError(f"Checkpoint {args.checkpoint} is not a DAMA, SimMIM or DDMIM model, so it has no mask "
                              f"figure: pass such a checkpoint (an MAE's masks show in --what reconstruction), or "
                              f"use --what attention for the AttMask masks.")
    dataset, stats = _visualize_data(args, model, stats)
    return draw_pixel_masks(model, dataset, stats["mean"], stats["std"], args.out, num_images=args.num_images,
                            seed=args.seed, title=f"{Path(args.checkpoint).name}: {_mask_description(model)}")


def _visualize_dama_masks(args, model, stats) -> Path:
    """``visualize --what masks`` on DAMA: student 1's mask, its per-patch error and student 2's mask."""
    dataset, stats = _visualize_data(args, model.student1, stats)
    title = (f"{Path(args.checkpoint).name}: DAMA student 2 mask = {model.student2_mask}, mask ratio "
             f"{model.mask_ratio}, overlap {model.mask_overlap_ratio}")
    return draw_dama_masks(model, dataset, stats["mean"], stats["std"], args.out,
                           num_images=args.num_images, seed=args.seed, title=title)


def _visualize_attention(args, model, stats) -> Path:
    """``visualize --what attention|rollout``: [CLS] attention or rollout, and the AttMask masks it gives."""
    encoder = select_encoder(model, args.encoder)
    if not -encoder.depth <= args.layer < encoder.depth:
        raise ConfigError(f"--layer {args.layer} does not exist: the encoder has blocks 0 to {encoder.depth - 1}.")
    dataset, stats = _visualize_data(args, encoder, stats)
    encoder = encoder.to(resolve_device(args.device))
    return draw_attention(encoder, dataset, stats["mean"], stats["std"], args.out, args.what, layer=args.layer,
                          head_fusion=args.head_fusion, discard_ratio=args.discard_ratio,
                          mask_ratio=args.mask_ratio, num_images=args.num_images, seed=args.seed,
                          title=f"{Path(args.checkpoint).name}: {args.what}")


def cmd_demo(args) -> int:
    run_demo(args.out, data=args.data, epochs=args.epochs)
    return 0


def cmd_models(args) -> int:
    for name in sorted(PRESETS):
        print(f"{name:24s} {PRESETS[name].description}")
    return 0


def cmd_config_show(args) -> int:
    print("\n".join(describe_keys(None if args.all else args.key, args.model)))
    return 0


# ----------------------------------------------------------------------------- parser

def _add_checkpoint_args(p: argparse.ArgumentParser,
                         encoder_help: str = "which encoder of the checkpoint (e.g. student1, teacher)") -> None:
    p.add_argument("--checkpoint", required=True,
                   help="mimkit checkpoint, or official MAE / timm ViT or Swin / DAMA / iBOT-DINO / SimMIM Swin "
                        "weights (format detected)")
    p.add_argument("--data", required=True, help="image folder, MedMNIST .npz, medmnist:NAME[@SIZE] or digits")
    p.add_argument("--model", default=None,
                   help="preset name for checkpoints not written by mimkit (default: ViT or Swin size read off the weights)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read old pickled checkpoints (can run code from the file: only for trusted files)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--encoder", default=None, help=encoder_help)


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (any method) from a YAML config plus key=value overrides",
                       description="Pretrain a model (any method) from a YAML config plus key=value overrides.",
                       epilog=CONFIG_KEYS_HINT)
    p.add_argument("--config", default=None, help="YAML file (see configs/); defaults apply when omitted")
    p.add_argument("overrides", nargs="*",
                   help="key=value, e.g. data.path=bloodmnist.npz train.epochs=40; mimkit config show --all lists the keys")
    p.set_defaults(func=cmd_pretrain)


def _add_knn(sub) -> None:
    p = sub.add_parser("knn", help="weighted k-NN accuracy of frozen features (DINO protocol)",
                       description="Weighted k-NN accuracy of frozen features (DINO protocol).")
    _add_checkpoint_args(p)
    p.add_argument("--k", nargs="+", action=_KValues, default=[10, 20, 100, 200], metavar="K",
                   help="neighbour counts, whole numbers >= 1 (default 10 20 100 200; above the bank size: clamped)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T), T > 0 (default 0.07)")
    p.add_argument("--pool", choices=["cls", "mean"], default=None,
                   help="[CLS] token or mean of patch tokens (default: [CLS] where the encoder has one, else mean)")
    p.add_argument("--no-final-norm", action="store_true", help="use the last block's output before the final norm")
    p.add_argument("--train-split", default="train", help="split of the labelled bank (default train)")
    p.add_argument("--test-split", default="test", help="split of the queries that are scored (default test)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass of feature extraction")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*",
                   help="key=value: data.labels_per_class=N, data.label_fraction=F, data.label_seed=S, "
                        "output_dir=DIR (writes DIR/knn_metrics.json)")
    p.set_defaults(func=cmd_knn, k_overrides=[])


def _add_supervised(sub) -> None:
    p = sub.add_parser("linprobe", help="linear probe of frozen features (MAE: BN + linear, LARS; DINO: last-n [CLS], SGD)",
                       epilog=CONFIG_KEYS_HINT)
    _add_checkpoint_args(p)
    p.add_argument("--config", default=None, help="YAML file (see configs/linprobe/); the MAE protocol applies when omitted")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. linprobe.protocol=dino data.labels_per_class=10")
    p.set_defaults(func=cmd_linprobe)

    p = sub.add_parser("finetune", help="fine-tune a pretrained encoder end to end (MAE recipe); --eval scores a fine-tuned checkpoint",
                       epilog=CONFIG_KEYS_HINT)
    _add_checkpoint_args(p)
    p.add_argument("--config", default=None, help="YAML file (see configs/finetune/); the MAE recipe applies when omitted")
    p.add_argument("--eval", action="store_true", help="only evaluate a fine-tuned checkpoint on data.test_split")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.epochs=20 data.label_fraction=0.01")
    p.set_defaults(func=cmd_finetune)


def _add_visualize(sub) -> None:
    p = sub.add_parser("visualize", help="figures from a checkpoint (reconstruction, masks, attention, rollout)")
    _add_checkpoint_args(p, "attention/rollout: which encoder (iBOT: teacher (default) or student)")
    p.add_argument("--what", default="reconstruction", choices=["reconstruction", "masks", "attention", "rollout"],
                   help="reconstruction (MAE, SimMIM, DDMIM: original, masked, reconstruction, reconstruction + "
                        "visible), masks (DAMA: both students' masks and student 1's error; SimMIM, DDMIM: the image "
                        "and its mask), attention / rollout ([CLS] attention or rollout of any ViT encoder, with the "
                        "AttMask masks it gives)")
    p.add_argument("--out", required=True, help="image file to write (.png, .pdf, .svg ...)")
    p.add_argument("--split", default="test", help="split the images are drawn from (default test)")
    p.add_argument("--num-images", type=_positive_int, default=6, help="rows of the figure, at least 1 (default 6)")
    p.add_argument("--seed", type=int, default=2, help="seed of the image choice and the random masks")
    p.add_argument("--layer", type=int, default=-1, help="attention: block whose [CLS] attention is shown (default: last)")
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean", help="attention/rollout: how heads are fused")
    p.add_argument("--discard-ratio", type=float, default=0.0,
                   help="attention/rollout: zero this fraction of the weakest attention entries per block (vit-explain: 0.9)")
    p.add_argument("--mask-ratio", type=float, default=0.4, help="attention/rollout: masking ratio of the AttMask columns")
    p.set_defaults(func=cmd_visualize)


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="describe the config keys (type, default, meaning)")
    actions = p.add_subparsers(dest="action", required=True, metavar="show",
                               help="show [KEY | --all]: type, default and meaning of config keys")
    show = actions.add_parser("show", help="list config keys with their type, default and meaning",
                              description=CONFIG_KEYS_HINT)
    show.add_argument("key", nargs="?", default=None,
                      help="a key (train.epochs), a section (train, data, model ...); omitted: every key")
    show.add_argument("--all", action="store_true", help="every key of every section")
    show.add_argument("--model", default=None, help=f"preset whose model.* arguments are listed (default {Config().model['name']})")
    show.set_defaults(func=cmd_config_show)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mimkit", description="Masked image modeling: pretrain, evaluate, visualise.",
                     epilog=CONFIG_KEYS_HINT)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; mimkit COMMAND --help lists its options")
    _add_pretrain(sub)
    _add_knn(sub)
    _add_supervised(sub)
    _add_visualize(sub)
    _add_config(sub)

    p = sub.add_parser("demo", help="pretrain briefly on an embedded dataset, compare k-NN with the untrained net, draw reconstructions")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--data", default="digits", help="dataset (default: scikit-learn digits, no download)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="default: a few minutes on a 2-core CPU")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="list model presets")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed in one line (2)
        return exc.code if isinstance(exc.code, int) else 2
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
