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

import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mimkit.errors import ConfigError


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented for pretraining."""

    path: str = "digits"  # image folder, MedMNIST .npz, "medmnist:NAME" or "digits" (embedded)
    split: str = "train"  # split used for pretraining
    mean: Optional[list[float]] = None  # per-channel; computed from the data when null
    std: Optional[list[float]] = None
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area range
    hflip: bool = True
    interpolation: str = "bicubic"
    num_workers: int = 0  # 0 = load in the training process (best for in-memory data on few cores)
    # Evaluation (finetune / linprobe / knn): splits and label fractions of the labelled train split.
    val_split: Optional[str] = "val"  # picks best.pt; null (or a dataset without it) = no validation
    test_split: str = "test"
    labels_per_class: Optional[int] = None  # keep N labelled images per class (stratified, seeded)
    label_fraction: Optional[float] = None  # keep this fraction of each class (at least 1 image per class)
    label_seed: int = 0  # seed of the label-fraction draw (independent of train.seed)


@dataclass
class TrainConfig:
    """Optimisation and run mechanics (official MAE defaults where they exist)."""

    epochs: int = 400
    warmup_epochs: float = 40.0
    batch_size: int = 64  # per process; effective batch = batch_size * accum_iter * world size
    accum_iter: int = 1
    blr: float = 1.5e-4  # base lr; lr = blr * effective batch / 256
    lr: Optional[float] = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: Optional[float] = None  # cosine schedule weight_decay -> this over the run (DINO/iBOT)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    optimizer: str = "adamw"  # adamw | lars (MAE linear probe) | sgd (DINO linear probe)
    momentum: float = 0.9  # lars / sgd
    clip_grad: Optional[float] = None  # max gradient norm; null = no clipping (official MAE)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 uses a gradient scaler)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    save_every: int = 20  # keep checkpoint-EPOCH.pt every N epochs (last.pt is written every epoch)
    log_every: int = 20  # iterations between log lines (the only host syncs in the loop)
    resume: bool = True  # continue from output_dir/last.pt when it exists
    progress: bool = True  # progress bar on the terminal


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (MAE recipe, methods.md §2.4); ignored by pretraining."""

    init: str = "pretrained"  # pretrained | random (same architecture, no weights: the baseline)
    encoder: Optional[str] = None  # which encoder of the checkpoint (DAMA: student1/student2; iBOT: teacher)
    global_pool: bool = True  # mean of patch tokens + new fc_norm (MAE default); false = [CLS] after norm
    img_size: Optional[int] = None  # fine-tune at another size (position table interpolated); null = checkpoint's
    drop_path: float = 0.1
    layer_decay: float = 0.75
    head_init_std: float = 2e-5
    smoothing: float = 0.1
    mixup: float = 0.0  # mixup alpha (MAE ImageNet: 0.8); 0 with cutmix 0 = off
    cutmix: float = 0.0  # cutmix alpha (MAE ImageNet: 1.0)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    randaug: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; null = off (1/3-channel data only)
    reprob: float = 0.25  # RandomErasing probability (mode pixel, count 1)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    eval_batch_size: int = 256
    eval_every: int = 1  # epochs between validation passes (always after the last epoch)


@dataclass
class LinprobeConfig:
    """Frozen-encoder linear classifier: MAE protocol (BN + linear, LARS) or DINO (last-n [CLS], SGD)."""

    protocol: str = "mae"  # mae | dino
    encoder: Optional[str] = None
    init: str = "pretrained"  # pretrained | random (frozen random encoder: the baseline)
    n_last_blocks: int = 4  # dino: concatenated [CLS] of the last n blocks (after the final norm)
    avgpool: bool = False  # dino: also append the mean patch token of the last block
    pool: str = "cls"  # mae: cls | mean
    cache_features: bool = True  # extract features once (no augmentation); false = frozen encoder + RRC/flip
    cache_dir: Optional[str] = None  # also keep the extracted features here, shared by runs (lr sweeps)
    eval_every: int = 1
    head_init_std: float = 0.01


@dataclass
class Config:
    output_dir: str = "runs/default"
    model: dict[str, Any] = field(default_factory=lambda: {"name": "mae_vit_tiny_patch4"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    linprobe: LinprobeConfig = field(default_factory=LinprobeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "finetune": FinetuneConfig, "linprobe": LinprobeConfig}
_CHOICES = {
    ("train", "optimizer"): ("adamw", "lars", "sgd"),
    ("finetune", "init"): ("pretrained", "random"),
    ("linprobe", "init"): ("pretrained", "random"),
    ("linprobe", "protocol"): ("mae", "dino"),
    ("linprobe", "pool"): ("cls", "mean"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("data", "interpolation"): ("bilinear", "bicubic", "nearest"),
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
    close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    hint = f" Did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
    return ConfigError(f"Unknown config key {key!r}.{hint} Valid keys here: {', '.join(known)}.")


def _build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(f"{prefix}.{key}", names)
        kwargs[key] = _check_type(value, hints[key], f"{prefix}.{key}")
        choices = _CHOICES.get((prefix, key))
        if choices and kwargs[key] not in choices:
            raise ConfigError(f"{prefix}.{key} must be one of {', '.join(choices)}, got {value!r}.")
    return cls(**kwargs)


def _validate_model(model: dict[str, Any]) -> dict[str, Any]:
    from mimkit.registry import get_preset, model_arguments

    if "name" not in model:
        raise ConfigError("model.name is missing: set it to a preset such as mae_vit_tiny_patch4.")
    get_preset(model["name"])  # raises with suggestions
    params = model_arguments(model["name"])
    hints = typing.get_type_hints(get_preset(model["name"]).cls.__init__)
    checked = {"name": model["name"]}
    for key, value in model.items():
        if key == "name":
            continue
        if key not in params:
            raise _unknown_key(f"model.{key}", ["name", *params])
        checked[key] = _check_type(value, hints.get(key, Any), f"model.{key}")
    return checked


def validate(cfg: Config) -> Config:
    """Cross-field checks that a type system cannot express."""
    from mimkit.registry import resolve_model_kwargs

    resolved = resolve_model_kwargs(**cfg.model)
    ratio = resolved.get("mask_ratio")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ConfigError(f"model.mask_ratio must lie strictly between 0 and 1, got {ratio}.")
    img, patch = resolved.get("img_size"), resolved.get("patch_size")
    if img is not None and patch is not None and img % patch:
        raise ConfigError(
            f"model.img_size {img} is not divisible by the patch size {patch}: "
            f"choose an image size that is a multiple of {patch} (e.g. {img - img % patch or patch})."
        )
    t = cfg.train
    for key in ("epochs", "batch_size", "accum_iter", "save_every", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(t, key)}.")
    if not 0 <= t.warmup_epochs <= t.epochs:
        raise ConfigError(f"train.warmup_epochs must lie in [0, train.epochs], got {t.warmup_epochs}.")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {t.betas}.")
    lo_hi = cfg.data.crop_scale
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        raise ConfigError(f"data.crop_scale must be [min, max] with 0 < min <= max <= 1, got {lo_hi}.")
    for key in ("mean", "std"):
        if getattr(cfg.data, key) is not None and (cfg.data.mean is None) != (cfg.data.std is None):
            raise ConfigError("data.mean and data.std must be given together (or both left null).")
    d = cfg.data
    if d.labels_per_class is not None and d.label_fraction is not None:
        raise ConfigError("Set data.labels_per_class or data.label_fraction, not both.")
    if d.labels_per_class is not None and d.labels_per_class < 1:
        raise ConfigError(f"data.labels_per_class must be at least 1, got {d.labels_per_class}.")
    if d.label_fraction is not None and not 0.0 < d.label_fraction <= 1.0:
        raise ConfigError(f"data.label_fraction must lie in (0, 1], got {d.label_fraction}.")
    f = cfg.finetune
    if len(f.crop_scale) != 2 or not 0 < f.crop_scale[0] <= f.crop_scale[1] <= 1:
        raise ConfigError(f"finetune.crop_scale must be [min, max] with 0 < min <= max <= 1, got {f.crop_scale}.")
    if not 0.0 < f.layer_decay <= 1.0:
        raise ConfigError(f"finetune.layer_decay must lie in (0, 1], got {f.layer_decay}.")
    if cfg.linprobe.n_last_blocks < 1:
        raise ConfigError(f"linprobe.n_last_blocks must be at least 1, got {cfg.linprobe.n_last_blocks}.")
    return cfg


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
    if key.split(".")[-1] in {"path", "output_dir", "name", "split"} and value is not None:
        value = raw  # paths and names stay strings even if they look like numbers
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
    if defaults:
        raw = _merge(defaults, raw)
    return from_dict(apply_overrides(raw, overrides or []))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
