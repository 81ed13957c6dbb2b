"""End-to-end fine-tuning with the MAE recipe (methods.md §2.4), trained by the one engine loop.

    mimkit finetune --checkpoint runs/mae/last.pt --data bloodmnist.npz train.epochs=20

The model is the classifier of the checkpoint encoder's family (pooled features + a head;
``mimkit.models.families``), e.g. the ViT classifier of ``mimkit.models.classifier``.
``finetune.head=mlp`` swaps the linear head for DDMIM's (methods.md §3.6: BatchNorm1d -> Linear(D,
``finetune.head_hidden_dim``) -> GELU -> Linear); the checkpoint records it, so ``--eval`` rebuilds it.
The validation and test splits are read and checked before the first step (a corrupt test image
fails at once, not after training) and reused for scoring.
Recipe pieces all come from timm: layer-decay parameter groups, Mixup/CutMix,
SoftTargetCrossEntropy / LabelSmoothingCrossEntropy, RandAugment, RandomErasing. The engine
(:mod:`mimkit.engine.trainer`) does warmup + cosine, AdamW, precision, DDP and checkpoints; after
every epoch the validation split is scored and the best model is kept as ``best.pt``.
``finetune.img_size`` (default: the checkpoint's) fine-tunes at another image size.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from mimkit.checkpoint import load_file
from mimkit.data import TransformedDataset, apply_label_fraction, build_transform, stats_for
from mimkit.data.transforms import interpolation_mode
from mimkit.engine.distributed import resolve_device
from mimkit.engine.trainer import TrainingSetup
from mimkit.errors import CheckpointError, ConfigError, DataError
from mimkit.eval.common import (
    EvalSplits, fit_batch_to_data, load_eval_splits, load_labelled_split, score_best_and_last, train_then_keep,
)
from mimkit.eval.metrics import classification_metrics, write_metrics
from mimkit.loading import detect_format, load_encoder
from mimkit.models.classifier import transfer_encoder_weights
from mimkit.models.encoder import require_cls_token
from mimkit.models.families import build_classifier_from_checkpoint, classifier_class

# The MAE fine-tuning recipe (FINETUNE.md) scaled to small data; YAML files and overrides sit on top.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/finetune",
    "train": {"epochs": 50, "warmup_epochs": 5, "blr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.05,
              "min_lr": 1e-6, "batch_size": 64, "save_every": 1000},
}

# -- data ----------------------------------------------------------------------------------------
class FinetuneTransform:
    """float [C, H, W] in [0, 1] -> normalised [C, S, S]: RandomResizedCrop + flip, RandAugment
    (1- or 3-channel images only: it works on PIL images), Normalize, RandomErasing.

    timm's RandAugment and RandomErasing draw from Python's ``random``; it is seeded from the
    torch generator (which the engine seeds per sample) and restored afterwards.
    """

    def __init__(self, img_size: int, mean, std, *, crop_scale=(0.08, 1.0), hflip: bool = True,
                 randaug: str | None = None, reprob: float = 0.0, interpolation: str = "bicubic"):
        steps = [v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=interpolation_mode(interpolation),
                                      antialias=True)]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        self.geometric = v2.Compose(steps)
        self.channels = len(mean)
        self.randaug = None
        if randaug and self.channels in (1, 3):
            fill = tuple(round(255 * m) for m in mean)
            # magnitude_max just below 10: at magnitude 10 timm's "inc" posterize asks for 0 bits,
            # which current Pillow rejects; 9.99 keeps 1 bit and changes nothing else.
            self.randaug = rand_augment_transform(randaug, dict(translate_const=int(img_size * 0.45),
                                                                img_mean=fill if self.channels == 3 else fill[0],
                                                                magnitude_max=9.99))
        self.normalize = v2.Normalize(list(mean), list(std))
        self.erase = RandomErasing(reprob, mode="pixel", max_count=1, device="cpu") if reprob > 0 else None

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = self.geometric(img)
        py_state = random.getstate()
        random.seed(int(torch.randint(0, 2**62, (1,))))
        try:
            if self.randaug is not None:
                img = self._randaugment(img)
            img = self.normalize(img)
            if self.erase is not None:
                img = self.erase(img)
        finally:
            random.setstate(py_state)
        return img

    def _randaugment(self, img: torch.Tensor) -> torch.Tensor:
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[..., 0] if self.channels == 1 else arr)
        out = np.asarray(self.randaug(pil), dtype=np.float32) / 255.0
        return torch.from_numpy(out.reshape(out.shape[0], out.shape[1], -1)).permute(2, 0, 1).contiguous()


@torch.no_grad()
def predict(model: nn.Module, dataset, transform, *, batch_size: int = 256, device="cpu",
            precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] (float32, CPU) and labels [N] of every image, in order."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    logits, labels = [], []
    for images, y in DataLoader(TransformedDataset(dataset, transform), batch_size=batch_size, shuffle=False):
        with autocast:
            logits.append(model.logits(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels).long()


# -- the task ------------------------------------------------------------------------------------
def _build_mixup(f_cfg, num_classes: int):
    if f_cfg.mixup > 0 or f_cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=f_cfg.mixup, cutmix_alpha=f_cfg.cutmix, prob=f_cfg.mixup_prob,
                      switch_prob=f_cfg.mixup_switch_prob, mode="batch", label_smoothing=f_cfg.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()  # smoothing is inside the mixed targets
    if f_cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=f_cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def _classifier_config(source: nn.Module, f_cfg, train) -> dict[str, Any]:
    """The classifier's constructor arguments: the encoder's architecture on this data's channels,
    at ``finetune.img_size`` when given, plus the fine-tuning options its family's class takes
    (the checkpoint's ``model_config``, from which evaluation rebuilds the same classifier)."""
    kwargs = {**source.architecture(), "in_chans": train.num_channels}
    if f_cfg.img_size is not None:
        if f_cfg.img_size % source.output_stride:
            raise ConfigError(f"finetune.img_size {f_cfg.img_size} is not a multiple of the encoder's stride "
                              f"{source.output_stride}: choose a multiple of {source.output_stride}.")
        kwargs["img_size"] = f_cfg.img_size
    if f_cfg.window_size is not None:
        if "window_size" not in kwargs:
            raise ConfigError(f"finetune.window_size applies to windowed encoders (Swin); this {source.family} "
                              f"encoder attends globally, so leave it out.")
        kwargs["window_size"] = f_cfg.window_size
    if not f_cfg.global_pool:
        require_cls_token(source, "finetune.global_pool=false")
    options = {"num_classes": train.num_classes, "global_pool": f_cfg.global_pool, "head_init_std": f_cfg.head_init_std,
               "layer_decay": f_cfg.layer_decay, "drop_path_rate": f_cfg.drop_path}
    if f_cfg.head != "linear":  # the default stays unrecorded: runs from before the option still resume
        options.update(head=f_cfg.head, head_hidden_dim=f_cfg.head_hidden_dim)
    params = inspect.signature(classifier_class(source.family)).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {"name": f"{source.family}_classifier", "family": source.family, **kwargs,
            **{k: v for k, v in options.items() if takes_any or k in params}}


def finetune_setup(cfg, di, device, checkpoint: str, model_name: str | None = None,
                   allow_pickle: bool = False) -> tuple[TrainingSetup, EvalSplits]:
    """The :class:`~mimkit.engine.trainer.TrainingSetup` of a fine-tuning run, and its val/test splits."""
    f_cfg, log = cfg.finetune, (print if di.is_main else None)
    train = load_labelled_split(cfg.data.path, cfg.data.split)
    splits = load_eval_splits(cfg, train, log)  # before anything slow: a bad split fails at once
    train = apply_label_fraction(train, cfg.data, log=log)
    fit_batch_to_data(cfg, len(train), log)
    source, recorded = load_encoder(checkpoint, model_name, allow_pickle, encoder=f_cfg.encoder, verbose=di.is_main)
    stats = stats_for(train, recorded)
    model_config = _classifier_config(source, f_cfg, train)
    torch.manual_seed(cfg.train.seed)
    try:
        model = classifier_class(source.family)(**{k: v for k, v in model_config.items() if k not in ("name", "family")})
    except ValueError as e:  # a geometry the family cannot build (e.g. a window that does not tile the image)
        raise ConfigError(f"{str(e).rstrip('.')} (set finetune.img_size / finetune.window_size).") from None
    if f_cfg.init == "pretrained":
        transfer_encoder_weights(source, model, log=log or (lambda *_: None))
    elif log:
        log("finetune.init=random: the checkpoint only sets the architecture; weights start from scratch")
    model.configure_training(*_build_mixup(f_cfg, train.num_classes))
    model.to(device)
    if (f_cfg.mixup > 0 or f_cfg.cutmix > 0) and cfg.train.batch_size % 2:
        raise ConfigError("Mixup/CutMix need an even train.batch_size.")
    if f_cfg.head == "mlp" and cfg.train.batch_size < 2:  # BatchNorm cannot normalise a batch of one
        raise ConfigError("finetune.head=mlp starts with a BatchNorm, which needs train.batch_size of at least 2.")
    if f_cfg.randaug and train.num_channels not in (1, 3) and log:
        log(f"RandAugment skipped: it works on 1- or 3-channel images, these have {train.num_channels}")
    img_size = model_config["img_size"]
    transform = FinetuneTransform(img_size, stats["mean"], stats["std"], crop_scale=f_cfg.crop_scale,
                                  hflip=cfg.data.hflip, randaug=f_cfg.randaug, reprob=f_cfg.reprob,
                                  interpolation=cfg.data.interpolation)
    val, evaluate = splits.val, None
    if val is not None:
        eval_transform = build_transform("eval", img_size, stats["mean"], stats["std"])

        def evaluate_val(m: nn.Module, epoch: int) -> dict[str, float] | None:
            if (epoch + 1) % f_cfg.eval_every and epoch + 1 != cfg.train.epochs:
                return None

            logits, labels = predict(m, val, eval_transform, batch_size=f_cfg.eval_batch_size, device=device,
                                     precision=cfg.train.precision)
            metrics = classification_metrics(logits, labels)
            return {"score": metrics["top1"], "val_top1": metrics["top1"], "val_auc": metrics["auc"]}

        evaluate = evaluate_val
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    description = (f"{source.family} ({n_params:.1f}M params, {'global pool' if f_cfg.global_pool else '[CLS]'}, "
                   f"{f_cfg.head} head, layer decay {f_cfg.layer_decay}, init {f_cfg.init}) on {cfg.data.path} [{len(train)} "
                   f"labelled images, {train.num_classes} classes]")
    setup = TrainingSetup(model, train, transform, model_config, stats, "finetune", description, evaluate,
                          extra={"source_checkpoint": str(checkpoint)})
    return setup, splits


def evaluate_classifier(model: nn.Module, ds, stats, *, batch_size: int = 256, device="cpu",
                        precision: str = "fp32") -> dict[str, Any]:
    """Metrics of a classifier on a labelled dataset (see :func:`mimkit.eval.metrics.classification_metrics`)."""
    transform = build_transform("eval", model.img_size, stats["mean"], stats["std"])
    logits, labels = predict(model, ds, transform, batch_size=batch_size, device=device, precision=precision)
    return classification_metrics(logits, labels, ds.class_names)


def run_finetune(cfg, checkpoint: str, model_name: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """Fine-tune, then score best.pt (and last.pt) on the test split; writes ``finetune_metrics.json``."""
    summary, splits = train_then_keep(
        cfg, lambda c, di, dev: finetune_setup(c, di, dev, checkpoint, model_name, allow_pickle))
    if int(os.environ.get("RANK", "0")) != 0:
        return summary
    out = Path(cfg.output_dir)
    device = resolve_device(cfg.train.device)
    result: dict[str, Any] = {"task": "finetune", "checkpoint": str(checkpoint), "data": cfg.data.path,
                              "test_split": cfg.data.test_split, "init": cfg.finetune.init,
                              "labels_per_class": cfg.data.labels_per_class, "label_fraction": cfg.data.label_fraction,
                              "train": summary}

    def score(obj: dict[str, Any], path: Path) -> dict[str, Any]:
        model = build_classifier_from_checkpoint(obj, str(path)).to(device)
        return evaluate_classifier(model, splits.test, obj["data_stats"], batch_size=cfg.finetune.eval_batch_size,
                                   device=device, precision=cfg.train.precision)

    return score_best_and_last(result, out, "finetune_metrics", score)


def eval_output_path(cfg, checkpoint: str, output_dir: str | Path | None = None) -> Path:
    """Where ``finetune --eval`` writes its metrics JSON.

    An explicit output folder (``output_dir``, or ``cfg.output_dir`` when it differs from the
    fine-tuning default) gets ``eval_metrics.json``, as a run folder does. Otherwise the file goes
    beside the checkpoint as ``eval_<checkpoint stem>_<data name>_<split>.json``: one per
    (checkpoint, data, split), so evaluations neither land in the working directory nor
    overwrite each other.
    """
    if output_dir is None and cfg.output_dir != FINETUNE_DEFAULTS["output_dir"]:
        output_dir = cfg.output_dir
    if output_dir is not None:
        return Path(output_dir) / "eval_metrics.json"
    data_name = Path(str(cfg.data.path).replace(":", "_")).stem or "data"
    return Path(checkpoint).resolve().parent / f"eval_{Path(checkpoint).stem}_{data_name}_{cfg.data.test_split}.json"


def evaluate_finetuned_checkpoint(cfg, checkpoint: str, allow_pickle: bool = False,
                                  output_dir: str | Path | None = None) -> dict[str, Any]:
    """``mimkit finetune --eval``: score a fine-tuned mimkit checkpoint on ``data.test_split``.

    Writes the metrics JSON beside the checkpoint unless an output folder is given (see
    :func:`eval_output_path`); ``result["metrics_json"]`` is its path.
    """
    obj = load_file(checkpoint, allow_pickle)
    if detect_format(obj) != "mimkit-finetuned":
        raise CheckpointError(f"Checkpoint {checkpoint} is not a fine-tuned mimkit classifier: --eval scores the "
                              f"best.pt/last.pt of a 'mimkit finetune' run (drop --eval to fine-tune it).")
    device = resolve_device(cfg.train.device)
    model = build_classifier_from_checkpoint(obj, checkpoint).to(device)
    test = load_labelled_split(cfg.data.path, cfg.data.test_split)
    if test.num_channels != model.in_chans:
        raise DataError(f"Checkpoint {checkpoint} classifies {model.in_chans}-channel images but {cfg.data.path} "
                        f"has {test.num_channels}: evaluate it on data with the channels it was fine-tuned on.")
    metrics = evaluate_classifier(model, test, obj["data_stats"], batch_size=cfg.finetune.eval_batch_size,
                                  device=device, precision=cfg.train.precision)
    result = {"task": "finetune-eval", "checkpoint": str(checkpoint), "data": cfg.data.path,
              "test_split": cfg.data.test_split, "epoch": obj["epoch"] + 1, "metrics": metrics}
    path = eval_output_path(cfg, checkpoint, output_dir)
    result["metrics_json"] = str(write_metrics(result, path.parent, path.stem))
    return result
