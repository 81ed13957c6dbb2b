"""Linear probing of a frozen encoder, trained by the one engine loop (methods.md §0.10, §2.5, §5.6).

Two protocols (``linprobe.protocol``):

* ``mae``: [CLS] (or mean patch token) after the pretrained final norm -> BatchNorm1d without
  affine (eps 1e-6) -> Linear (trunc-normal std 0.01); LARS with a real trust ratio, base lr 0.1,
  weight decay 0, warmup + cosine.
* ``dino``: the [CLS] tokens of the last ``n_last_blocks`` blocks (each after the final norm),
  concatenated (+ the mean patch token with ``avgpool``) -> Linear (normal std 0.01, bias 0);
  momentum SGD, weight decay 0, cosine.

With ``linprobe.cache_features=true`` (default) features are extracted once without augmentation
and the head trains on them, so a sweep costs seconds (``linprobe.cache_dir`` keeps them on disk
for later runs, see :func:`mimkit.eval.features.cached_features`); ``false`` runs the frozen
encoder every step with RandomResizedCrop + flip. The val and test splits are read and encoded
before the first step, so a bad split fails at once; the test features score best.pt and last.pt.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import mimkit
from mimkit.checkpoint import extract_state_dict
from mimkit.data import apply_label_fraction, build_transform, stats_for
from mimkit.engine.distributed import resolve_device
from mimkit.engine.trainer import TrainingSetup
from mimkit.errors import ConfigError
from mimkit.eval.common import (
    fit_batch_to_data, load_eval_splits, load_labelled_split, score_best_and_last, train_then_keep,
)
from mimkit.eval.features import cached_features, labels_digest, path_fingerprint, probe_feature_dim, probe_features
from mimkit.eval.metrics import classification_metrics
from mimkit.loading import load_encoder
from mimkit.methods.base import StepOutput
from mimkit.models.families import fresh_encoder

LINPROBE_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/linprobe",
    "train": {"epochs": 90, "warmup_epochs": 10, "blr": 0.1, "weight_decay": 0.0, "min_lr": 0.0,
              "batch_size": 256, "optimizer": "lars", "save_every": 1000},
}
DINO_TRAIN = {"optimizer": "sgd", "warmup_epochs": 0, "epochs": 100, "blr": 0.001}


class LinearProbe(nn.Module):
    """[N, D] features (or images, with a frozen ``encoder``) -> [N, num_classes] logits.

    ``batchnorm``: BatchNorm1d(D, affine=False) before the linear layer (MAE protocol). The
    encoder, when given, is frozen and always kept in eval mode.
    """

    uses_labels = True

    def __init__(self, feature_dim: int, num_classes: int, *, batchnorm: bool = True, init_std: float = 0.01,
                 encoder: nn.Module | None = None, feature_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.encoder = encoder
        self.feature_kwargs = feature_kwargs or {}
        if encoder is not None:
            encoder.requires_grad_(False)
        self.bn = nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.head = nn.Linear(feature_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=init_std)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: no dropout / drop-path
        return self

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None:
            with torch.no_grad():
                inputs = probe_features(self.encoder, inputs, **self.feature_kwargs).float()
        return self.head(self.bn(inputs))

    def forward(self, inputs: torch.Tensor, sample_seeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> StepOutput:
        logits = self.logits(inputs)
        loss = nn.functional.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return StepOutput(loss, {"loss": loss.detach(), "train_acc": acc.detach()})

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}


class FeatureDataset(Dataset):
    """(feature [D], label) pairs held in memory; has ``labels``/``num_classes``/``class_names`` like ImageDataset."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 class_names: list[str] | None = None):
        self.features, self.labels, self.num_classes = features, labels, num_classes
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.features[i], int(self.labels[i])


def _identity(x):
    return x


def feature_kwargs(l_cfg, encoder: nn.Module) -> dict[str, Any]:
    """Pooling of the probe's features; pool "auto" (and the DINO protocol's per-block token) is the
    encoder's ``default_pool``: [CLS] where it has one, else the mean token."""
    pool = encoder.default_pool if l_cfg.protocol == "dino" or l_cfg.pool == "auto" else l_cfg.pool
    if l_cfg.protocol == "dino":
        return dict(pool=pool, final_norm=True, n_last_blocks=l_cfg.n_last_blocks, avgpool=l_cfg.avgpool)
    return dict(pool=pool, final_norm=True, n_last_blocks=1, avgpool=False)


def _cache_key(cfg, checkpoint: str, kwargs: dict, stats: dict) -> dict | None:
    """What every split's features depend on (None for a random encoder: never cached).

    The data and checkpoint enter by content fingerprint (:func:`~mimkit.eval.features.path_fingerprint`),
    not only by name, and the precision changes the numbers, so both are part of the key.
    """
    if cfg.linprobe.init == "random":
        return None
    return {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_fingerprint": path_fingerprint(checkpoint),
            "encoder": cfg.linprobe.encoder, "data": cfg.data.path, "data_fingerprint": path_fingerprint(cfg.data.path),
            "precision": cfg.train.precision, "mimkit": mimkit.__version__, **kwargs, "stats": stats}


def _split_key(key: dict | None, split: str, dataset, **extra) -> dict | None:
    """The cache key of one split: the run's key, the split's name, size and labels (and ``extra``)."""
    return key and {**key, "split": split, "n": len(dataset), "labels": labels_digest(dataset.labels), **extra}


def _frozen_encoder(cfg, checkpoint, model_name, allow_pickle, log):
    encoder, recorded = load_encoder(checkpoint, model_name, allow_pickle, encoder=cfg.linprobe.encoder,
                                     verbose=log is not None)
    if cfg.linprobe.init == "random":
        # Same architecture, untrained weights: the baseline the pretrained features must beat.
        torch.manual_seed(cfg.train.seed)
        encoder = fresh_encoder(encoder).eval()
        if log:
            log("linprobe.init=random: a randomly initialised encoder of the same architecture is probed")
    return encoder, recorded


def linprobe_setup(cfg, di, device, checkpoint: str, model_name: str | None = None,
                   allow_pickle: bool = False) -> tuple[TrainingSetup, FeatureDataset]:
    """The :class:`~mimkit.engine.trainer.TrainingSetup` of a linear probe, and the test split's features.

    The val and test splits are read, checked and encoded here, before the first step.
    """
    l_cfg, log = cfg.linprobe, (print if di.is_main else None)
    train = load_labelled_split(cfg.data.path, cfg.data.split)
    splits = load_eval_splits(cfg, train, log)
    train = apply_label_fraction(train, cfg.data, log=log)
    fit_batch_to_data(cfg, len(train), log)
    encoder, recorded = _frozen_encoder(cfg, checkpoint, model_name, allow_pickle, log)
    if encoder.in_chans != train.num_channels:
        raise ConfigError(f"The encoder takes {encoder.in_chans} channels but {cfg.data.path} has "
                          f"{train.num_channels}: a frozen probe cannot adapt the patch embedding (fine-tune instead).")
    encoder.to(device)
    stats = stats_for(train, recorded)
    kwargs = feature_kwargs(l_cfg, encoder)
    key = _cache_key(cfg, checkpoint, kwargs, stats)

    def features(ds, split: str, **extra) -> FeatureDataset:
        x, y = cached_features(encoder, ds, stats, kwargs, cache_key=_split_key(key, split, ds, **extra),
                               cache_dir=l_cfg.cache_dir, device=device, precision=cfg.train.precision, log=log)
        return FeatureDataset(x, y, ds.num_classes, ds.class_names)

    test = features(splits.test, cfg.data.test_split)
    val = features(splits.val, cfg.data.val_split) if splits.val is not None else None
    dim = probe_feature_dim(encoder, **kwargs)
    if l_cfg.cache_features:
        subset = [cfg.data.labels_per_class, cfg.data.label_fraction, cfg.data.label_seed]
        dataset, transform = features(train, cfg.data.split, subset=subset), _identity
        model = LinearProbe(dim, train.num_classes, batchnorm=l_cfg.protocol == "mae", init_std=l_cfg.head_init_std)
    else:
        dataset = train
        transform = build_transform("pretrain", encoder.img_size, stats["mean"], stats["std"],
                                    crop_scale=(0.08, 1.0), hflip=cfg.data.hflip, interpolation=cfg.data.interpolation)
        model = LinearProbe(dim, train.num_classes, batchnorm=l_cfg.protocol == "mae", init_std=l_cfg.head_init_std,
                            encoder=encoder, feature_kwargs=kwargs)
    model.to(device)
    description = (f"linear probe ({l_cfg.protocol} protocol, {dim}-d features, "
                   f"{'cached' if l_cfg.cache_features else 'augmented'}, init {l_cfg.init}) on {cfg.data.path} "
                   f"[{len(train)} labelled images, {train.num_classes} classes]")
    model_config = {"name": "linear_probe", "feature_dim": dim, "num_classes": train.num_classes,
                    "batchnorm": l_cfg.protocol == "mae", **kwargs}
    setup = TrainingSetup(model, dataset, transform, model_config, stats, "linprobe", description,
                          _val_evaluator(cfg, val, device), extra={"source_checkpoint": str(checkpoint)})
    return setup, test


def _val_evaluator(cfg, val: FeatureDataset | None, device):
    """The engine's per-epoch validation on the val features (None without a val split: no best.pt)."""
    if val is None:
        return None

    def evaluate_val(m: nn.Module, epoch: int) -> dict[str, float] | None:
        if (epoch + 1) % cfg.linprobe.eval_every and epoch + 1 != cfg.train.epochs:
            return None
        metrics = classification_metrics(head_logits(m, val.features.to(device)), val.labels)
        return {"score": metrics["top1"], "val_top1": metrics["top1"], "val_auc": metrics["auc"]}

    return evaluate_val


@torch.no_grad()
def head_logits(model: LinearProbe, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits [N, C] of cached features [N, D] (eval mode: BN uses its running statistics)."""
    was = model.training
    model.eval()
    out = torch.cat([model.head(model.bn(features[i:i + batch_size])) for i in range(0, len(features), batch_size)])
    model.train(was)
    return out.float().cpu()


def run_linprobe(cfg, checkpoint: str, model_name: str | None = None, allow_pickle: bool = False) -> dict[str, Any] | None:
    """Train the probe, then score best.pt (and last.pt) on the test split; writes ``linprobe_metrics.json``."""
    if cfg.linprobe.protocol == "dino" and cfg.train.optimizer == "lars":
        cfg.train.optimizer = "sgd"  # the DINO protocol trains its head with SGD
    summary, test = train_then_keep(
        cfg, lambda c, di, dev: linprobe_setup(c, di, dev, checkpoint, model_name, allow_pickle))
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    out, device = Path(cfg.output_dir), resolve_device(cfg.train.device)
    result: dict[str, Any] = {"task": "linprobe", "checkpoint": str(checkpoint), "data": cfg.data.path,
                              "protocol": cfg.linprobe.protocol, "init": cfg.linprobe.init,
                              "labels_per_class": cfg.data.labels_per_class,
                              "label_fraction": cfg.data.label_fraction, "train": summary}

    def score(obj: dict[str, Any], path: Path) -> dict[str, Any]:
        mc = obj["model_config"]
        probe = LinearProbe(mc["feature_dim"], mc["num_classes"], batchnorm=mc["batchnorm"])
        probe.load_state_dict({k: v for k, v in extract_state_dict(obj).items() if not k.startswith("encoder.")},
                              strict=True)
        probe.to(device)
        logits = head_logits(probe, test.features.to(device))
        return classification_metrics(logits, test.labels, test.class_names)

    return score_best_and_last(result, out, "linprobe_metrics", score)
