"""End-to-end fine-tuning with the MAE recipe (methods.md §2.4), trained by the one engine loop.

    mimkit finetune --checkpoint runs/mae/last.pt --data bloodmnist.npz train.epochs=20

The classifier is the pretrained ViT plus global average pooling of the patch tokens and a fresh
``fc_norm`` LayerNorm (the pretrained final norm is dropped, as in MAE), or the [CLS] token after
the pretrained norm (``finetune.global_pool=false``), then a linear head initialised with std 2e-5.
Parameter names are timm's, so a fine-tuned mimkit checkpoint is also a timm ViT state dict.

Recipe pieces all come from timm: layer-decay parameter groups, Mixup/CutMix,
SoftTargetCrossEntropy / LabelSmoothingCrossEntropy, RandAugment, RandomErasing. The engine
(:mod:`mimkit.engine.trainer`) does warmup + cosine, AdamW, precision, DDP and checkpoints; after
every epoch the validation split is scored and the best model is kept as ``best.pt``.

Rules for a checkpoint that does not match the data:

* another image size: ``finetune.img_size`` (default: the checkpoint's); the position table is
  interpolated bicubically (§0.11) and images are resized to it.
* another channel count: the patch-embedding kernel is adapted with timm ``adapt_input_conv``
  (to 1 channel: summed over the checkpoint's channels; to N channels: the checkpoint's channels
  repeated and scaled by C_ckpt / N). What was done is printed.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mimkit.errors import CheckpointError, ConfigError
from mimkit.methods.base import StepOutput
from mimkit.models.vit import MaskedViT

# The MAE fine-tuning recipe (FINETUNE.md) scaled to small data; YAML files and overrides sit on top.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/finetune",
    "train": {"epochs": 50, "warmup_epochs": 5, "blr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.05,
              "min_lr": 1e-6, "batch_size": 64, "save_every": 1000},
}

VIT_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")


class ViTClassifier(MaskedViT):
    """Pretrained ViT + pooled features + linear head; ``forward`` is a supervised training step.

    Args (beyond :class:`MaskedViT`'s): num_classes; global_pool (mean patch token + fc_norm,
    else [CLS] after norm); head_init_std; layer_decay (lr scale decay^(depth+1-layer), §0.7).
    """

    uses_labels = True  # the engine passes labels to forward

    def __init__(self, num_classes: int, global_pool: bool = True, head_init_std: float = 2e-5,
                 layer_decay: float = 0.75, **vit_kwargs: Any) -> None:
        super().__init__(learnable_pos_embed=True, **vit_kwargs)
        self.num_classes, self.global_pool, self.layer_decay = num_classes, global_pool, layer_decay
        if global_pool:
            self.norm = nn.Identity()  # MAE drops the pretrained final norm and learns fc_norm instead
            self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(self.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)
        self.mixup_fn: Callable | None = None
        self.criterion: nn.Module = nn.CrossEntropyLoss()

    def configure_training(self, mixup_fn: Callable | None, criterion: nn.Module) -> None:
        self.mixup_fn, self.criterion = mixup_fn, criterion

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> pooled features [N, D] (after fc_norm)."""
        tokens = self.encode(images).tokens
        return self.fc_norm(tokens[:, 1:].mean(dim=1) if self.global_pool else tokens[:, 0])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, num_classes]."""
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor, sample_seeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> StepOutput:
        if labels is None:
            raise ValueError("ViTClassifier.forward is a training step: pass labels (use .logits() to predict)")
        targets = labels
        if self.mixup_fn is not None:
            # timm's Mixup draws from numpy's global RNG: seed it from the batch's sample seeds so a
            # resumed run mixes exactly as an uninterrupted one.
            seed = 0 if sample_seeds is None else int(sample_seeds.sum().item() % (2**32))
            state = np.random.get_state()
            np.random.seed(seed)
            images, targets = self.mixup_fn(images, labels)
            np.random.set_state(state)
        logits = self.logits(images)
        loss = self.criterion(logits, targets)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return StepOutput(loss, {"loss": loss.detach(), "train_acc": acc.detach()})

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm layer grouping: stem = layer 0, block k = layer k+1, the rest (norm, fc_norm, head) = depth+1.

        (timm's own ViT matcher merges the final norm into the last block; MAE/BEiT give it the head's layer.)
        """
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed|^masked_embed", blocks=[(r"^blocks\.(\d+)", None)])

    def optimizer_param_groups(self, weight_decay: float) -> list[dict]:
        """timm layer-decay groups (each carries ``lr_scale``; 1-D params and tokens get no decay)."""
        from timm.optim import param_groups_layer_decay

        return param_groups_layer_decay(self, weight_decay, no_weight_decay_list=tuple(self.no_weight_decay()),
                                        layer_decay=self.layer_decay)


# -- weights -------------------------------------------------------------------------------------
def transfer_encoder_weights(source: nn.Module, target: ViTClassifier, log=print) -> None:
    """Copy a pretrained encoder into ``target``, adapting the position table and input channels."""
    from timm.models import adapt_input_conv

    from mimkit.checkpoint import encoder_state, load_state_dict_checked
    from mimkit.models.pos_embed import interpolate_pos_embed

    state = encoder_state(source)
    pos = state["pos_embed"]
    if pos.shape[1] != target.pos_embed.shape[1]:
        old = int(round((pos.shape[1] - 1) ** 0.5))
        log(f"position table interpolated (bicubic) from a {old}x{old} to a "
            f"{target.grid_size[0]}x{target.grid_size[1]} patch grid")
        state["pos_embed"] = interpolate_pos_embed(pos, target.grid_size)
    weight = state["patch_embed.proj.weight"]
    if weight.shape[1] != target.in_chans:
        how = "summed over" if target.in_chans == 1 else f"repeated and scaled by {weight.shape[1]}/{target.in_chans} from"
        log(f"patch embedding adapted from {weight.shape[1]} to {target.in_chans} input channels "
            f"(kernel {how} the checkpoint's channels, timm adapt_input_conv)")
        state["patch_embed.proj.weight"] = adapt_input_conv(target.in_chans, weight, base_chans=weight.shape[1])
    if target.global_pool:
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    if target.masked_embed is None:
        state.pop("masked_embed", None)
    load_state_dict_checked(target, state, "The pretrained encoder", strict=False)
    missing = [k for k in target.state_dict() if k not in state and not k.startswith(("head.", "fc_norm.", "masked_embed"))]
    if missing:
        raise CheckpointError(f"The pretrained encoder lacks {len(missing)} weights of the classifier "
                              f"(e.g. {', '.join(missing[:3])}): is it a ViT checkpoint?")


def build_classifier_from_checkpoint(obj: dict[str, Any], what: str) -> ViTClassifier:
    """Rebuild a fine-tuned mimkit classifier (``task: finetune``) and load its weights."""
    from mimkit.checkpoint import extract_state_dict, load_state_dict_checked

    kwargs = {k: v for k, v in obj["model_config"].items() if k != "name"}
    model = ViTClassifier(**kwargs)
    load_state_dict_checked(model, extract_state_dict(obj), f"Checkpoint {what}")
    return model.eval()


# -- data ----------------------------------------------------------------------------------------
class FinetuneTransform:
    """float [C, H, W] in [0, 1] -> normalised [C, S, S]: RandomResizedCrop + flip, RandAugment
    (1- or 3-channel images only: it works on PIL images), Normalize, RandomErasing.

    timm's RandAugment and RandomErasing draw from Python's ``random``; it is seeded from the
    torch generator (which the engine seeds per sample) and restored afterwards.
    """

    def __init__(self, img_size: int, mean, std, *, crop_scale=(0.08, 1.0), hflip: bool = True,
                 randaug: str | None = None, reprob: float = 0.0, interpolation: str = "bicubic"):
        from timm.data import rand_augment_transform
        from timm.data.random_erasing import RandomErasing
        from torchvision.transforms import v2

        from mimkit.data.transforms import _INTERPOLATION

        steps = [v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=_INTERPOLATION[interpolation],
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
        from PIL import Image

        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[..., 0] if self.channels == 1 else arr)
        out = np.asarray(self.randaug(pil), dtype=np.float32) / 255.0
        return torch.from_numpy(out.reshape(out.shape[0], out.shape[1], -1)).permute(2, 0, 1).contiguous()


def fit_batch_to_data(cfg, num_images: int, log=print) -> None:
    """Small labelled sets (label fractions): lower train.batch_size to the largest even size that fits."""
    need = cfg.train.batch_size * cfg.train.accum_iter * int(os.environ.get("WORLD_SIZE", "1"))
    if num_images < need:
        fitted = max(2, (num_images // (cfg.train.accum_iter * int(os.environ.get("WORLD_SIZE", "1")))) // 2 * 2)
        if log:
            log(f"train.batch_size lowered from {cfg.train.batch_size} to {fitted}: only {num_images} labelled images")
        cfg.train.batch_size = fitted


def data_stats_for(dataset, recorded: dict[str, list[float]] | None) -> dict[str, list[float]]:
    """The checkpoint's pretraining statistics when their channel count fits the data, else the data's own."""
    from mimkit.data import compute_channel_stats

    if recorded is not None and len(recorded["mean"]) == dataset.num_channels:
        return {"mean": list(recorded["mean"]), "std": list(recorded["std"])}
    mean, std = compute_channel_stats(dataset)
    return {"mean": mean, "std": std}


def load_labelled_split(path: str, split: str, required: bool = True):
    """An ImageDataset with labels, or None for an optional split that the data does not have."""
    from mimkit.data import DataError, load_dataset

    try:
        ds = load_dataset(path, split)
    except DataError:
        if required:
            raise
        return None
    if ds.num_classes == 0 or (ds.labels < 0).any():
        raise ConfigError(f"{path} split {split!r} has no labels: classification needs class sub-folders or a "
                          f"labelled .npz.")
    return ds


@torch.no_grad()
def predict(model: ViTClassifier, dataset, transform, *, batch_size: int = 256, device="cpu",
            precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] (float32, CPU) and labels [N] of every image, in order."""
    from mimkit.data import TransformedDataset

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
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if f_cfg.mixup > 0 or f_cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=f_cfg.mixup, cutmix_alpha=f_cfg.cutmix, prob=f_cfg.mixup_prob,
                      switch_prob=f_cfg.mixup_switch_prob, mode="batch", label_smoothing=f_cfg.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()  # smoothing is inside the mixed targets
    if f_cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=f_cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def finetune_setup(cfg, di, device, checkpoint: str, model_name: str | None = None, allow_pickle: bool = False):
    """The :class:`~mimkit.engine.trainer.TrainingSetup` of a fine-tuning run."""
    from mimkit.checkpoint import load_encoder
    from mimkit.data import apply_label_fraction, build_transform
    from mimkit.engine.trainer import TrainingSetup

    f_cfg, log = cfg.finetune, (print if di.is_main else None)
    train = load_labelled_split(cfg.data.path, cfg.data.split)
    train = apply_label_fraction(train, cfg.data, log=log)
    fit_batch_to_data(cfg, len(train), log)
    source, recorded = load_encoder(checkpoint, model_name, allow_pickle, encoder=f_cfg.encoder, verbose=di.is_main)
    if not isinstance(source, MaskedViT):
        raise CheckpointError(f"Checkpoint {checkpoint} does not hold a ViT encoder.")
    stats = data_stats_for(train, recorded)
    kwargs = {k: getattr(source, k) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    kwargs["mlp_ratio"] = source.blocks[0].mlp.fc1.out_features / source.embed_dim
    kwargs["in_chans"] = train.num_channels
    if f_cfg.img_size is not None:
        if f_cfg.img_size % kwargs["patch_size"]:
            raise ConfigError(f"finetune.img_size {f_cfg.img_size} is not a multiple of the patch size "
                              f"{kwargs['patch_size']}.")
        kwargs["img_size"] = f_cfg.img_size
    model_config = {"name": "vit_classifier", **kwargs, "num_classes": train.num_classes,
                    "global_pool": f_cfg.global_pool, "head_init_std": f_cfg.head_init_std,
                    "layer_decay": f_cfg.layer_decay, "drop_path_rate": f_cfg.drop_path}
    torch.manual_seed(cfg.train.seed)
    model = ViTClassifier(**{k: v for k, v in model_config.items() if k != "name"})
    if f_cfg.init == "pretrained":
        transfer_encoder_weights(source, model, log=log or (lambda *_: None))
    elif log:
        log("finetune.init=random: the checkpoint only sets the architecture; weights start from scratch")
    model.configure_training(*_build_mixup(f_cfg, train.num_classes))
    model.to(device)
    if (f_cfg.mixup > 0 or f_cfg.cutmix > 0) and cfg.train.batch_size % 2:
        raise ConfigError("Mixup/CutMix need an even train.batch_size.")
    if f_cfg.randaug and train.num_channels not in (1, 3) and log:
        log(f"RandAugment skipped: it works on 1- or 3-channel images, these have {train.num_channels}")
    transform = FinetuneTransform(kwargs["img_size"], stats["mean"], stats["std"], crop_scale=f_cfg.crop_scale,
                                  hflip=cfg.data.hflip, randaug=f_cfg.randaug, reprob=f_cfg.reprob,
                                  interpolation=cfg.data.interpolation)
    val = load_labelled_split(cfg.data.path, cfg.data.val_split, required=False) if cfg.data.val_split else None
    evaluate = None
    if val is not None:
        eval_transform = build_transform("eval", kwargs["img_size"], stats["mean"], stats["std"])

        def evaluate_val(m: nn.Module, epoch: int) -> dict[str, float] | None:
            from mimkit.eval.metrics import classification_metrics

            if (epoch + 1) % f_cfg.eval_every and epoch + 1 != cfg.train.epochs:
                return None

            logits, labels = predict(m, val, eval_transform, batch_size=f_cfg.eval_batch_size, device=device,
                                     precision=cfg.train.precision)
            metrics = classification_metrics(logits, labels)
            return {"score": metrics["top1"], "val_top1": metrics["top1"], "val_auc": metrics["auc"]}

        evaluate = evaluate_val
    elif log:
        log(f"no {cfg.data.val_split!r} split: best.pt is not kept (only last.pt)")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    description = (f"ViT ({n_params:.1f}M params, {'global pool' if f_cfg.global_pool else '[CLS]'}, "
                   f"layer decay {f_cfg.layer_decay}, init {f_cfg.init}) on {cfg.data.path} [{len(train)} "
                   f"labelled images, {train.num_classes} classes]")
    return TrainingSetup(model, train, transform, model_config, stats, "finetune", description, evaluate,
                         extra={"source_checkpoint": str(checkpoint)})


def evaluate_classifier(model: ViTClassifier, data: str, split: str, stats, *, batch_size: int = 256,
                        device="cpu", precision: str = "fp32") -> dict[str, Any]:
    """Metrics of a classifier on one split (see :func:`mimkit.eval.metrics.classification_metrics`)."""
    from mimkit.data import build_transform
    from mimkit.eval.metrics import classification_metrics

    ds = load_labelled_split(data, split)
    transform = build_transform("eval", model.img_size, stats["mean"], stats["std"])
    logits, labels = predict(model, ds, transform, batch_size=batch_size, device=device, precision=precision)
    return classification_metrics(logits, labels, ds.class_names)


def run_finetune(cfg, checkpoint: str, model_name: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """Fine-tune, then score best.pt (and last.pt) on the test split; writes ``finetune_metrics.json``."""
    from mimkit.checkpoint import load_file
    from mimkit.engine.distributed import resolve_device
    from mimkit.engine.trainer import run_training
    from mimkit.eval.metrics import write_metrics

    summary = run_training(cfg, lambda c, di, dev: finetune_setup(c, di, dev, checkpoint, model_name, allow_pickle))
    if int(os.environ.get("RANK", "0")) != 0:
        return summary
    out = Path(cfg.output_dir)
    device = resolve_device(cfg.train.device)
    result: dict[str, Any] = {"task": "finetune", "checkpoint": str(checkpoint), "data": cfg.data.path,
                              "test_split": cfg.data.test_split, "init": cfg.finetune.init,
                              "labels_per_class": cfg.data.labels_per_class, "label_fraction": cfg.data.label_fraction,
                              "train": summary}
    for name in ("best", "last"):
        path = out / f"{name}.pt"
        if not path.is_file():
            continue
        obj = load_file(path)
        model = build_classifier_from_checkpoint(obj, str(path)).to(device)
        metrics = evaluate_classifier(model, cfg.data.path, cfg.data.test_split, obj["data_stats"],
                                      batch_size=cfg.finetune.eval_batch_size, device=device,
                                      precision=cfg.train.precision)
        result[name] = {"epoch": obj["epoch"] + 1, "metrics": metrics}
    chosen = "best" if "best" in result else "last"
    result["metrics"] = result[chosen]["metrics"]
    result["reported"] = chosen
    result["metrics_json"] = str(write_metrics(result, out, "finetune_metrics"))
    return result


def evaluate_finetuned_checkpoint(cfg, checkpoint: str, allow_pickle: bool = False) -> dict[str, Any]:
    """``mimkit finetune --eval``: score a fine-tuned mimkit checkpoint on ``data.test_split``, write JSON."""
    from mimkit.checkpoint import detect_format, load_file
    from mimkit.engine.distributed import resolve_device
    from mimkit.eval.metrics import write_metrics

    obj = load_file(checkpoint, allow_pickle)
    if detect_format(obj) != "mimkit-finetuned":
        raise CheckpointError(f"Checkpoint {checkpoint} is not a fine-tuned mimkit classifier: --eval scores the "
                              f"best.pt/last.pt of a 'mimkit finetune' run (drop --eval to fine-tune it).")
    device = resolve_device(cfg.train.device)
    model = build_classifier_from_checkpoint(obj, checkpoint).to(device)
    metrics = evaluate_classifier(model, cfg.data.path, cfg.data.test_split, obj["data_stats"],
                                  batch_size=cfg.finetune.eval_batch_size, device=device, precision=cfg.train.precision)
    result = {"task": "finetune-eval", "checkpoint": str(checkpoint), "data": cfg.data.path,
              "test_split": cfg.data.test_split, "epoch": obj["epoch"] + 1, "metrics": metrics}
    result["metrics_json"] = str(write_metrics(result, cfg.output_dir, "eval_metrics"))
    return result
