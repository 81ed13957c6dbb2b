"""Typed run configuration: YAML files plus ``key=value`` overrides, validated with clear errors.

A config has four parts::

    output_dir: runs/mae_blood           # where checkpoints, logs and figures go
    model: {name: mae_vit_tiny_patch4, norm_pix_loss: true, ...}   # preset + constructor overrides
    data:  {path: bloodmnist.npz, ...}   # DataConfig
    train: {epochs: 40, ...}             # TrainConfig

``model`` keys are checked against the preset's constructor (see :mod:`mimkit.registry`);
``data`` and ``train`` keys against the dataclasses below. Values given on the command line
are parsed as YAML (``train.epochs=40``, ``train.betas=[0.9,0.95]``, ``train.clip_grad=null``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from mimkit.errors import ConfigError
from mimkit.registry import argument_help, get_preset, model_arguments, resolve_model_kwargs


def _key(default: Any, meaning: str) -> Any:
    """A config field whose one-line ``meaning`` is stored in its metadata (``mimkit config show``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": meaning})
    return field(default=default, metadata={"help": meaning})


def _section(cls: type, meaning: str) -> Any:
    return field(default_factory=cls, metadata={"help": meaning})


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented for pretraining."""

    path: Union[str, list[str]] = _key(
        "digits", 'image folder (or a list of folders, classes merged by name), MedMNIST .npz, '
        '"medmnist:NAME[@SIZE]" or "digits" (embedded)')
    split: str = _key("train", "split used for pretraining")
    mean: Optional[list[float]] = _key(None, "per-channel mean in [0, 1] units; null = computed from the data")
    std: Optional[list[float]] = _key(None, "per-channel std (> 0), given together with data.mean")
    crop_scale: list[float] = _key([0.2, 1.0], "RandomResizedCrop area range [min, max] within (0, 1]")
    hflip: bool = _key(True, "random horizontal flip during pretraining")
    interpolation: str = _key("bicubic", "resampling of crops and resizes")
    num_workers: Union[int, str] = _key(
        "auto", "DataLoader workers; auto = 0 for data in memory, else the cores of this process (at most 8)")
    in_memory: Union[bool, str] = _key(
        "auto", "image folders: true = decode all into memory first, false = decode per item in the workers, "
        "auto = in memory when the estimated decoded size is under half the available memory")
    on_error: str = _key(
        "skip", "pretraining: an unreadable image file is raise (stop) or skip (replaced by another image, counted)")
    max_bad_fraction: float = _key(
        0.001, "pretraining stops when more than this fraction of the files failed to read in an epoch")
    subset: Optional[str] = _key(None, "pretrain on a subset: first_per_class, random (both with subset_fraction) "
                                       "or file_list (with subset_file)")
    subset_fraction: Optional[float] = _key(None, "fraction in (0, 1] of the files (per class for first_per_class)")
    subset_seed: int = _key(0, "seed of data.subset=random")
    subset_file: Optional[str] = _key(None, "data.subset=file_list: text file, one image path per line (absolute "
                                            "or relative to the split folder)")
    draft: bool = _key(False, "decode large JPEGs at 1/2, 1/4 or 1/8 scale when the crop box stays at least twice "
                              "the output size (faster; a slight low-pass of large crops)")
    stats_images: int = _key(10000, "channel mean/std are estimated from a seeded sample of this many images")
    # Evaluation (finetune / linprobe / knn): splits and label fractions of the labelled train split.
    val_split: Optional[str] = _key("val", "evaluation: split that picks best.pt; null (or absent) = no validation")
    test_split: str = _key("test", "evaluation: split the final metrics are reported on")
    labels_per_class: Optional[int] = _key(None, "evaluation: keep N labelled train images per class (seeded)")
    label_fraction: Optional[float] = _key(None, "evaluation: keep this fraction in (0, 1] of each class (>= 1 image)")
    label_seed: int = _key(0, "seed of the label-fraction draw (independent of train.seed)")


@dataclass
class TrainConfig:
    """Optimisation and run mechanics (official MAE defaults where they exist)."""

    epochs: int = _key(400, "passes over the training split")
    warmup_epochs: float = _key(40.0, "linear lr warmup length in epochs, then train.lr_schedule (clamped to a shorter run)")
    batch_size: int = _key(64, "per process; effective batch = batch_size * accum_iter * world size")
    accum_iter: int = _key(1, "gradient accumulation steps per optimizer step")
    blr: float = _key(1.5e-4, "base lr; lr = blr * effective batch / 256")
    lr: Optional[float] = _key(None, "absolute lr; overrides blr when set")
    min_lr: float = _key(0.0, "lr at the end of the cosine decay")
    lr_schedule: str = _key("cosine", "after warmup: cosine (half cycle to min_lr) or multistep (lr x lr_gamma at "
                                      "each of lr_milestones; SimMIM, DDMIM)")
    lr_milestones: list[float] = _key([], "multistep: epochs at which the lr is multiplied by lr_gamma, increasing, "
                                          "none before the warmup ends or after train.epochs")
    lr_gamma: float = _key(0.1, "multistep: lr factor at each milestone, in (0, 1]")
    weight_decay: float = _key(0.05, "decoupled weight decay (not applied to norms and biases)")
    weight_decay_end: Optional[float] = _key(None, "cosine schedule weight_decay -> this over the run (DINO/iBOT)")
    betas: list[float] = _key([0.9, 0.95], "AdamW betas, two numbers in [0, 1)")
    optimizer: str = _key("adamw", "adamw, lars (MAE linear probe) or sgd (DINO linear probe)")
    momentum: float = _key(0.9, "momentum of lars / sgd")
    clip_grad: Optional[float] = _key(None, "max gradient norm; null = no clipping (official MAE)")
    precision: str = _key("fp32", "autocast precision; fp16 also uses a gradient scaler")
    compile: bool = _key(False, "torch.compile the model")
    device: str = _key("auto", "auto (GPU when there is one), cpu, cuda or cuda:N")
    seed: int = _key(0, "seed of initialisation, data order and masks")
    save_every: int = _key(20, "keep checkpoint-EPOCH.pt every N epochs (last.pt is written every epoch)")
    log_every: int = _key(20, "iterations between log lines (the only host syncs in the loop)")
    resume: bool = _key(True, "continue from output_dir/last.pt when it exists")
    resume_changed: bool = _key(False, "resume even though training settings (lr, epochs, batch, schedule, seed, ...) differ from the saved run")
    progress: bool = _key(True, "progress bar on the terminal")


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (MAE recipe, methods.md §2.4); ignored by pretraining."""

    init: str = _key("pretrained", "pretrained, or random (same architecture, no weights: the baseline)")
    encoder: Optional[str] = _key(None, "which encoder of the checkpoint (DAMA: student1/student2; iBOT: teacher)")
    global_pool: bool = _key(True, "mean of patch tokens + new fc_norm (MAE default); false = [CLS] after norm")
    img_size: Optional[int] = _key(None, "fine-tune at another size (position table interpolated); null = checkpoint's")
    window_size: Optional[int] = _key(None, "windowed encoders (Swin): attention window while fine-tuning (relative "
                                            "position bias tables resampled); null = checkpoint's")
    drop_path: float = _key(0.1, "stochastic depth rate of the last block (linear over blocks), in [0, 1)")
    layer_decay: float = _key(0.75, "lr multiplier per block from the top, in (0, 1]")
    head_init_std: float = _key(2e-5, "std of the new classifier head's initial weights (its last Linear)")
    head: str = _key("linear", "head on the pooled features: linear, or mlp (DDMIM: BN -> Linear -> GELU -> Linear)")
    head_hidden_dim: int = _key(1024, "hidden width of the mlp head")
    smoothing: float = _key(0.1, "label smoothing, in [0, 1)")
    mixup: float = _key(0.0, "mixup alpha (MAE ImageNet: 0.8); 0 with cutmix 0 = off")
    cutmix: float = _key(0.0, "cutmix alpha (MAE ImageNet: 1.0)")
    mixup_prob: float = _key(1.0, "probability of mixing a batch when mixup or cutmix is on, in [0, 1]")
    mixup_switch_prob: float = _key(0.5, "probability of cutmix instead of mixup when both are on, in [0, 1]")
    randaug: Optional[str] = _key("rand-m9-mstd0.5-inc1", "timm RandAugment spec; null = off (1/3-channel data only)")
    reprob: float = _key(0.25, "RandomErasing probability (mode pixel, count 1), in [0, 1]")
    crop_scale: list[float] = _key([0.08, 1.0], "RandomResizedCrop area range [min, max] within (0, 1]")
    eval_batch_size: int = _key(256, "batch size of validation and test passes")
    eval_every: int = _key(1, "epochs between validation passes (always after the last epoch)")


@dataclass
class LinprobeConfig:
    """Frozen-encoder linear classifier: MAE protocol (BN + linear, LARS) or DINO (last-n [CLS], SGD)."""

    protocol: str = _key("mae", "mae (BN + linear, LARS) or dino (last-n [CLS], SGD)")
    encoder: Optional[str] = _key(None, "which encoder of the checkpoint (DAMA: student1/student2; iBOT: teacher)")
    init: str = _key("pretrained", "pretrained, or random (frozen random encoder: the baseline)")
    n_last_blocks: int = _key(4, "dino: concatenated [CLS] of the last n blocks (after the final norm)")
    avgpool: bool = _key(False, "dino: also append the mean patch token of the last block")
    pool: str = _key("auto", "mae: [CLS] token (cls), mean patch token (mean), or auto ([CLS] where the encoder has one)")
    cache_features: bool = _key(True, "extract features once (no augmentation); false = frozen encoder + RRC/flip")
    cache_dir: Optional[str] = _key(None, "also keep the extracted features here, shared by runs (lr sweeps)")
    eval_every: int = _key(1, "epochs between validation passes (always after the last epoch)")
    head_init_std: float = _key(0.01, "std of the linear head's initial weights")


@dataclass
class Config:
    output_dir: str = _key("runs/default", "folder of checkpoints, logs, metrics and figures")
    model: dict[str, Any] = _key({"name": "mae_vit_tiny_patch4"},
                                 "preset name plus constructor overrides (mimkit config show model)")
    data: DataConfig = _section(DataConfig, "where the images come from and how they are augmented")
    train: TrainConfig = _section(TrainConfig, "optimisation and run mechanics")
    finetune: FinetuneConfig = _section(FinetuneConfig, "end-to-end fine-tuning (mimkit finetune)")
    linprobe: LinprobeConfig = _section(LinprobeConfig, "linear probing (mimkit linprobe)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "finetune": FinetuneConfig, "linprobe": LinprobeConfig}
_CHOICES = {
    ("train", "optimizer"): ("adamw", "lars", "sgd"),
    ("train", "lr_schedule"): ("cosine", "multistep"),
    ("finetune", "init"): ("pretrained", "random"),
    ("finetune", "head"): ("linear", "mlp"),
    ("linprobe", "init"): ("pretrained", "random"),
    ("linprobe", "protocol"): ("mae", "dino"),
    ("linprobe", "pool"): ("auto", "cls", "mean"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("data", "interpolation"): ("bilinear", "bicubic", "nearest"),
    ("data", "on_error"): ("raise", "skip"),
    ("data", "subset"): ("first_per_class", "random", "file_list"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return value coerced to tp (int -> float, tuple -> list) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}; write it as [a, b].")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-3" as a string; accept plain numbers written that way
            return tp(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}.")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key} must be of type {tp.__name__}, got {value!r} ({type(value).__name__}).")
    return value


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    """One sentence: the unknown key, the closest valid one (difflib), all valid keys of its section."""
    section = key.rsplit(".", 1)[0] if "." in key else ""
    listing = f"valid keys here: {', '.join(known)}; mimkit config show {section or '--all'} describes them"
    close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    if close:
        return ConfigError(f"Unknown config key {key!r}: Did you mean {section + '.' if section else ''}{close[0]} "
                           f"({listing})?")
    return ConfigError(f"Unknown config key {key!r}: use one of the {listing}.")


def _build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(f"{prefix}.{key}", names)
        kwargs[key] = _check_type(value, hints[key], f"{prefix}.{key}")
        choices = _CHOICES.get((prefix, key))
        if choices and kwargs[key] is not None and kwargs[key] not in choices:
            raise ConfigError(f"{prefix}.{key} must be one of {', '.join(choices)}, got {value!r}.")
    return cls(**kwargs)


def _validate_model(model: dict[str, Any]) -> dict[str, Any]:
    if "name" not in model:
        raise ConfigError("model.name is missing: set it to a preset such as mae_vit_tiny_patch4.")
    params = model_arguments(model["name"])  # raises with suggestions for an unknown preset
    hints = typing.get_type_hints(get_preset(model["name"]).cls.__init__)
    checked = {"name": model["name"]}
    for key, value in model.items():
        if key == "name":
            continue
        if key not in params:
            raise _unknown_key(f"model.{key}", ["name", *params])
        checked[key] = _check_type(value, hints.get(key, Any), f"model.{key}")
    return checked


def _check_range(cfg: Config, key: str, interval: str) -> None:
    """``section.key`` (when set) must lie in ``interval``, written "(0, 1]": round = open, square = closed."""
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if value is None:
        return
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = low < value if interval[0] == "(" else low <= value
    below = value < high if interval[-1] == ")" else value <= high
    if not (math.isfinite(value) and above and below):
        raise ConfigError(f"{key} must lie in {interval}, got {value}: set {key} to a value in that range.")


# Fractions and probabilities that cannot leave their interval.
_RANGES = {
    "data.label_fraction": "(0, 1]",
    "data.subset_fraction": "(0, 1]",
    "data.max_bad_fraction": "[0, 1]",
    "finetune.layer_decay": "(0, 1]",
    "finetune.drop_path": "[0, 1)",
    "finetune.smoothing": "[0, 1)",
    "finetune.mixup_prob": "[0, 1]",
    "finetune.mixup_switch_prob": "[0, 1]",
    "finetune.reprob": "[0, 1]",
}


def _check_crop_scale(key: str, lo_hi: list[float]) -> None:
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        raise ConfigError(f"{key} must be [min, max] with 0 < min <= max <= 1, got {lo_hi}: e.g. {key}=[0.2,1.0].")


def _check_stats(d: DataConfig) -> None:
    """data.mean/data.std: given together, one value per channel each, std finite and > 0."""
    if (d.mean is None) != (d.std is None):
        raise ConfigError("data.mean and data.std must be given together (or both left null).")
    if d.mean is None:
        return
    if len(d.mean) != len(d.std) or not d.mean:
        raise ConfigError(f"data.mean and data.std need one value per channel each, got {len(d.mean)} and "
                          f"{len(d.std)}: give both the same length.")
    if not all(math.isfinite(s) and s > 0 for s in d.std):
        raise ConfigError(f"data.std must be finite and greater than 0 for every channel, got {d.std}: "
                          f"set positive values, or data.mean=null data.std=null to compute them from the data.")
    if not all(math.isfinite(m) for m in d.mean):
        raise ConfigError(f"data.mean must be finite, got {d.mean}: fix it, or set data.mean=null data.std=null.")


def _check_data_mechanics(d: DataConfig) -> None:
    """data.in_memory / num_workers take auto or a value; data.path lists are not empty."""
    if not isinstance(d.in_memory, bool) and d.in_memory != "auto":
        raise ConfigError(f"data.in_memory must be auto, true or false, got {d.in_memory!r}.")
    if isinstance(d.num_workers, str) and d.num_workers != "auto":
        raise ConfigError(f"data.num_workers must be auto or a whole number of 0 or more, got {d.num_workers!r}.")
    if isinstance(d.num_workers, int) and d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be 0 or more, got {d.num_workers}: e.g. data.num_workers=auto.")
    if isinstance(d.path, list) and not d.path:
        raise ConfigError("data.path is an empty list: give a folder, or a list of folders [a, b].")
    if d.stats_images < 1:
        raise ConfigError(f"data.stats_images must be at least 1, got {d.stats_images}.")


def _check_model(resolved: dict[str, Any]) -> None:
    ratio = resolved.get("mask_ratio")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ConfigError(f"model.mask_ratio must lie strictly between 0 and 1, got {ratio}: e.g. model.mask_ratio=0.75.")
    img, patch = resolved.get("img_size"), resolved.get("patch_size")
    if img is not None and patch is not None and img % patch:
        raise ConfigError(
            f"model.img_size {img} is not divisible by the patch size {patch}: "
            f"choose an image size that is a multiple of {patch} (e.g. {img - img % patch or patch})."
        )


def _check_lr_schedule(t: TrainConfig) -> None:
    """Milestones only with multistep, increasing, after the warmup (as the official SimMIM scheduler
    asserts) and within the run; the gamma in (0, 1]."""
    m = t.lr_milestones
    if t.lr_schedule == "cosine":
        if m:
            raise ConfigError(f"train.lr_milestones {m} only apply to train.lr_schedule=multistep: set "
                              f"train.lr_schedule=multistep, or train.lr_milestones=[] for the cosine schedule.")
        return
    if any(b <= a for a, b in zip(m, m[1:])):
        raise ConfigError(f"train.lr_milestones must be strictly increasing, got {m}: e.g. train.lr_milestones=[700].")
    outside = [x for x in m if not (0 < x <= t.epochs and x >= t.warmup_epochs)]
    if outside:
        raise ConfigError(f"train.lr_milestones {outside} lie outside the run after warmup [{t.warmup_epochs:g}, "
                          f"{t.epochs}] (train.warmup_epochs, train.epochs): choose epochs within it.")
    if not (math.isfinite(t.lr_gamma) and 0 < t.lr_gamma <= 1):
        raise ConfigError(f"train.lr_gamma must lie in (0, 1], got {t.lr_gamma}: e.g. train.lr_gamma=0.1.")


def validate(cfg: Config) -> Config:
    """Cross-field checks that a type system cannot express (all before anything is written)."""
    _check_model(resolve_model_kwargs(**cfg.model))
    t = cfg.train
    for key in ("epochs", "batch_size", "accum_iter", "save_every", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(t, key)}.")
    if not (math.isfinite(t.warmup_epochs) and t.warmup_epochs >= 0):  # longer than the run: the engine clamps it
        raise ConfigError(f"train.warmup_epochs must be 0 or more, got {t.warmup_epochs}: e.g. train.warmup_epochs=0.")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {t.betas}.")
    _check_lr_schedule(t)
    _check_crop_scale("data.crop_scale", cfg.data.crop_scale)
    _check_crop_scale("finetune.crop_scale", cfg.finetune.crop_scale)
    _check_stats(cfg.data)
    d = cfg.data
    _check_data_mechanics(d)
    if d.labels_per_class is not None and d.label_fraction is not None:
        raise ConfigError("Set data.labels_per_class or data.label_fraction, not both.")
    if d.labels_per_class is not None and d.labels_per_class < 1:
        raise ConfigError(f"data.labels_per_class must be at least 1, got {d.labels_per_class}.")
    for key, interval in _RANGES.items():
        _check_range(cfg, key, interval)
    if cfg.finetune.head_hidden_dim < 1:
        raise ConfigError(f"finetune.head_hidden_dim must be at least 1, got {cfg.finetune.head_hidden_dim}.")
    if cfg.finetune.window_size is not None and cfg.finetune.window_size < 1:
        raise ConfigError(f"finetune.window_size must be at least 1, got {cfg.finetune.window_size}.")
    if cfg.linprobe.n_last_blocks < 1:
        raise ConfigError(f"linprobe.n_last_blocks must be at least 1, got {cfg.linprobe.n_last_blocks}.")
    return cfg


def validate_knn(k: list[int], temperature: float) -> None:
    """k-NN settings: every k a whole number >= 1, the temperature finite and > 0."""
    bad = [x for x in k if isinstance(x, bool) or not isinstance(x, int) or x < 1]
    if bad or not k:
        raise ConfigError(f"--k must be whole numbers of at least 1, got {bad or k}: e.g. --k 10 20.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature must be a finite number greater than 0, got {temperature}: "
                          f"e.g. --temperature 0.07 (DINO).")


def _check_writable(target: Path, folder: Path, what: str) -> None:
    """``folder`` (``target`` itself, or the folder of an output file) can be created and written."""
    existing = folder
    while not existing.exists():  # the first ancestor that exists: the rest is created below it
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file, not a folder" if existing == target else f"lies under the file {existing}"
        raise ConfigError(f"{what} {target} {where}: choose another {what} or move that file away.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {target} cannot be written ({existing} is not writable for this user): choose a "
                          f"folder you can write to, or fix its permissions.")


def check_output_dir(path: str | os.PathLike, what: str = "output_dir") -> None:
    """Refuse a run folder that is a file, lies under a file, or cannot be written (before anything starts)."""
    p = Path(path).expanduser()
    _check_writable(p, p, what)


def check_output_file(path: str | os.PathLike, what: str = "--out") -> None:
    """Refuse an output file path that is a folder, lies under a file, or cannot be written."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a folder, not a file: pass a file path such as {p / 'figure.png'}.")
    _check_writable(p, p.parent, what)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (as loaded from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError("A config must be a mapping with keys output_dir, model, data, train.")
    top = [f.name for f in dataclasses.fields(Config)]
    for key in raw:
        if key not in top:
            raise _unknown_key(key, top)
    kwargs: dict[str, Any] = {}
    if "output_dir" in raw:
        kwargs["output_dir"] = _check_type(raw["output_dir"], str, "output_dir")
    if "model" in raw:
        if not isinstance(raw["model"], dict):
            raise ConfigError("model must be a mapping with at least a name, e.g. {name: mae_vit_tiny_patch4}.")
        kwargs["model"] = _validate_model({"name": Config().model["name"], **raw["model"]})
    for name, cls in _SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{name} must be a mapping of keys to values, got {section!r}.")
        kwargs[name] = _build_section(cls, section, name)
    return validate(Config(**kwargs))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.epochs=40' -> (['train', 'epochs'], 40); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} is not of the form key=value (e.g. train.epochs=40).")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"Override {text!r} has an empty key; write e.g. data.path=/my/images.")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if key.split(".")[-1] in {"path", "output_dir", "name", "split"} and value is not None and not isinstance(value, list):
        value = raw  # paths and names stay strings even if they look like numbers (a list of paths stays a list)
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for part in keys[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"Override {text!r}: {part} is not a section.")
            node = child
        node[keys[-1]] = value
    return raw


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: ``top`` wins, sections are merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None) -> Config:
    """Read a YAML file (or start from defaults when path is None) and apply overrides.

    ``defaults`` (a nested dict, e.g. the fine-tuning recipe) sits under the file and the overrides.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {p} does not exist: pass an existing YAML file (see configs/).")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {p} is not valid YAML ({str(exc).splitlines()[0]}): fix its syntax.")
        if not isinstance(raw, dict):  # before the overrides, which index into it
            raise ConfigError(f"Config file {p} holds a {type(raw).__name__}, not a mapping: write it as "
                              f"key: value lines with the keys output_dir, model, data, train (see configs/).")
    if defaults:
        raw = _merge(copy.deepcopy(defaults), raw)  # overrides edit raw in place: never the caller's defaults
    return from_dict(apply_overrides(raw, overrides or []))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- key reference

@dataclass(frozen=True)
class KeyInfo:
    """One config key as ``mimkit config show`` lists it."""

    key: str
    type: str
    default: Any
    meaning: str

    def line(self) -> str:
        return f"{self.key} ({self.type}, default {json.dumps(self.default)}): {self.meaning}"


def _type_text(tp: Any) -> str:
    """``Optional[list[float]]`` -> ``list[float] or null``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_type_text(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in typing.get_args(tp) else "")
    if typing.get_origin(tp) is list:
        return f"list[{', '.join(_type_text(a) for a in typing.get_args(tp))}]"
    if tp is inspect.Parameter.empty:
        return "any"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _section_keys(name: str, cls: type) -> list[KeyInfo]:
    hints, defaults = typing.get_type_hints(cls), cls()
    out = []
    for f in dataclasses.fields(cls):
        choices = _CHOICES.get((name, f.name))
        tp = " | ".join(choices) if choices else _type_text(hints[f.name])
        out.append(KeyInfo(f"{name}.{f.name}", tp, getattr(defaults, f.name), f.metadata["help"]))
    return out


def model_keys(name: str) -> list[KeyInfo]:
    """``model.*`` keys of preset ``name``: its constructor arguments with the preset's defaults."""
    defaults = resolve_model_kwargs(name)
    hints = typing.get_type_hints(get_preset(name).cls.__init__)
    meanings = argument_help(name)
    keys = [KeyInfo("model.name", "str", name, f"model preset ({get_preset(name).description}); mimkit models lists them")]
    for arg, param in model_arguments(name).items():
        default = defaults.get(arg)
        meaning = meanings.get(arg, "constructor argument (no description)").rstrip(".")
        if arg == "in_chans":  # the data decides it unless the config pins it (engine.trainer.prepare_data)
            meaning += " (pretraining takes it from the data when unset)"
        keys.append(KeyInfo(f"model.{arg}", _type_text(hints.get(arg, param.annotation)),
                            list(default) if isinstance(default, tuple) else default, meaning))
    return keys


def config_keys(model_name: str | None = None) -> list[KeyInfo]:
    """Every key a config may set, in file order: output_dir, model.* (of the preset), data.*, train.* ..."""
    top = {f.name: f for f in dataclasses.fields(Config)}
    keys = [KeyInfo("output_dir", "str", top["output_dir"].default, top["output_dir"].metadata["help"])]
    keys += model_keys(model_name or Config().model["name"])
    for name, cls in _SECTIONS.items():
        keys += _section_keys(name, cls)
    return keys


def describe_keys(query: str | None = None, model_name: str | None = None) -> list[str]:
    """Lines of ``mimkit config show``: one key, a section (``train``, ``model``) or, for None, all keys."""
    keys = config_keys(model_name)
    if query is None:
        return [k.line() for k in keys]
    query = query.strip().rstrip(".")
    chosen = [k for k in keys if k.key == query or k.key.startswith(query + ".")]
    if not chosen:
        close = difflib.get_close_matches(query, [k.key for k in keys], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"No config key or section {query!r}{hint}: mimkit config show --all lists every key.")
    return [k.line() for k in chosen]

