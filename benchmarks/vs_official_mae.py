"""mimkit against the official MAE code (facebookresearch/mae), on today's libraries, in one run.

What it measures (MAE ViT-Ti/4 at 28 px, 3 channels, batch 128, mask ratio 0.75, 2 threads):

* ``--part step``: training-step speed of the two *models* side by side in this process. The same
  random image tensor goes to both; one step is forward, backward and an AdamW step (betas 0.9/0.95,
  weight decay 0.05, none on norms/biases). mimkit's optimizer comes from
  ``mimkit.engine.optim.build_optimizer``; the official one is main_pretrain.py's recipe
  (``add_weight_decay`` groups, today ``timm.optim.param_groups_weight_decay``, plus
  ``torch.optim.AdamW``). fp32 and bf16 autocast. After ``--warmup`` steps of each, blocks of
  ``--steps`` steps alternate official, mimkit, official, mimkit ... for ``--rounds`` rounds; the
  median images/s of each and the ratio mimkit/official are reported per precision.
* ``--part e2e``: one epoch end to end on real data. BloodMNIST's train split is written once as an
  ImageFolder of PNGs (``WORK/bloodmnist_train_N/train/<label>/*.png``, N rounded down to whole
  batches so both drop no image and run N/128 optimizer steps). Then, per worker count W of
  ``--workers`` and ``--e2e-rounds`` times, alternating: the official ``main_pretrain.py`` (in a
  subprocess with the shims below, timed around ``engine_pretrain.train_one_epoch``, so start-up
  and checkpoint saving are excluded) and ``mimkit pretrain`` (its ``log.jsonl`` epoch record:
  ``epoch_time_s``, which likewise starts at the first batch request and excludes start-up). Both
  get ``OMP_NUM_THREADS=MKL_NUM_THREADS=--threads``, fp32 (the official CPU path), blr 1.5e-4,
  wd 0.05, 1 epoch with a 1-epoch warmup, W DataLoader workers (mimkit: ``data.num_workers=W``
  when the config has that key), ImageNet mean/std.

One JSON object per measurement is printed (and written to ``--out`` as JSON lines), with
``loadavg_1m`` (the 1-minute load average when it ended, this benchmark's own threads included:
well above ``--threads`` plus the DataLoader workers means someone else shared the cores), then a
summary object per precision / worker count and a final one.

Compatibility shims, applied at run time in the benchmark's processes; no official file is edited
and none is copied into this repository (``--official-git`` extracts ``git archive HEAD`` into
``--official-dir``, which must lie outside it):

1. timm >= 0.9 ``Block`` rejects ``qk_scale``: while ``models_mae`` is imported,
   ``timm.models.vision_transformer.Block`` is a subclass that accepts and drops ``qk_scale``
   (MAE passes None, the default scale); the original is restored right after the import.
2. ``util/misc.py`` does ``from torch._six import inf`` (module removed in torch 2.0): a stub
   module ``torch._six`` with ``inf = math.inf`` is put in ``sys.modules``.
3. ``util/pos_embed.py`` uses ``np.float`` (alias removed in numpy 1.24): ``np.float = float``.
4. main_pretrain.py only: ``assert timm.__version__ == "0.3.2"``, so ``timm.__version__`` is set to
   "0.3.2" in its subprocess; ``timm.optim.optim_factory.add_weight_decay`` (gone) is set to
   ``timm.optim.param_groups_weight_decay`` (same groups: no decay for 1-D tensors and ``.bias``).
5. main_pretrain.py only: ``engine_pretrain.train_one_epoch`` calls ``torch.cuda.synchronize()``
   every step, which raises without a GPU; it is a no-op when CUDA is unavailable. (Their
   ``torch.cuda.amp.autocast()`` / ``GradScaler()`` only warn on a CPU and disable themselves.)
6. ``models_mae.mae_vit_tiny_patch4`` is added: ``MaskedAutoencoderViT`` with mimkit's
   ``mae_vit_tiny_patch4`` preset arguments (read from ``mimkit.registry.resolve_model_kwargs``:
   192-d, depth 12, 3 heads, decoder 128 x 4 blocks x 2 heads, mlp 4, LayerNorm eps 1e-6,
   norm_pix_loss as the preset, 28 px, patch 4). Both models' parameter counts are asserted equal.

Run (full measurements on 2 quiet cores: step about 2.5 min; e2e about 10 min for W in {0, 2} x 2
rounds x 2 implementations of one 93-step epoch on 11904 images, plus ~15 s to write the PNGs once):

    python benchmarks/vs_official_mae.py --official-git /work/.mirror/facebookresearch+mae/repo \\
        --official-dir /tmp/official-mae --part step --out benchmarks/results/vs_official_mae_step_cpu.jsonl
    python benchmarks/vs_official_mae.py --official-dir /tmp/official-mae --part e2e --workers 0,2 \\
        --out benchmarks/results/vs_official_mae_e2e_cpu.jsonl
    # mimkit's lazy folder path: add --mimkit-arg data.in_memory=false (repeatable KEY=VALUE)

Smoke check: ``--part all --rounds 1 --steps 3 --warmup 1 --max-images 256 --e2e-rounds 1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import types
import warnings
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = "mae_vit_tiny_patch4"
RUNNER = "_official_runner"  # hidden sub-command: the official main_pretrain.py under the shims
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # main_pretrain.py's Normalize


class UserError(Exception):
    """A mistake in the command line or the inputs: one sentence, exit status 2."""


# --- the official checkout --------------------------------------------------------------------------

def _inside_repo(path: Path) -> bool:
    return path == REPO or REPO in path.parents


def prepare_official(official_dir: str, official_git: str | None) -> Path:
    """The official checkout at ``official_dir``, extracted from ``official_git`` when it is missing."""
    target = Path(official_dir).expanduser().resolve()
    if _inside_repo(target):
        raise UserError(f"--official-dir {target} lies inside the mimkit repository: extract the official code "
                        f"outside it, e.g. --official-dir /tmp/official-mae.")
    if not target.exists():
        if official_git is None:
            raise UserError(f"--official-dir {target} does not exist: give a checkout of facebookresearch/mae, or "
                            f"--official-git GIT_DIR to extract one there.")
        _extract(Path(official_git).expanduser(), target)
    missing = [f for f in ("models_mae.py", "main_pretrain.py", "engine_pretrain.py", "util/misc.py")
               if not (target / f).is_file()]
    if missing:
        raise UserError(f"--official-dir {target} is not a checkout of facebookresearch/mae (no {missing[0]}).")
    return target


def _extract(git_dir: Path, target: Path) -> None:
    """``git --git-dir=GIT archive HEAD | tar -x -C target``; a failed extraction leaves no folder."""
    if not git_dir.is_dir():
        raise UserError(f"--official-git {git_dir} is not a folder: give the official repository's git directory.")
    target.mkdir(parents=True)
    archive = subprocess.Popen(["git", f"--git-dir={git_dir}", "archive", "HEAD"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, capture_output=True)
    archive.stdout.close()
    git_err = archive.communicate()[1]
    if archive.returncode or untar.returncode:
        shutil.rmtree(target, ignore_errors=True)
        why = (git_err or untar.stderr).decode(errors="replace").strip().splitlines()
        raise UserError(f"Could not extract {git_dir} into {target} ({why[-1] if why else 'git archive failed'}).")


def official_commit(official_git: str | None) -> str | None:
    """The commit the checkout came from, when the git directory is known (an archive does not say)."""
    if official_git is None:
        return None
    out = subprocess.run(["git", f"--git-dir={official_git}", "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


# --- shims ------------------------------------------------------------------------------------------

def install_shims(official: Path, arch: dict, for_main_pretrain: bool = False) -> types.ModuleType:
    """Make the official code import on today's torch/timm/numpy (docstring items 1-6); returns models_mae."""
    import numpy as np
    import timm
    import timm.models.vision_transformer as tvit
    import torch

    try:  # item 2: util/misc.py only needs torch._six.inf
        import torch._six  # noqa: F401
    except ImportError:
        six = types.ModuleType("torch._six")
        six.inf = math.inf
        sys.modules["torch._six"] = six
    if not hasattr(np, "float"):  # item 3: util/pos_embed.py's dtype=np.float
        np.float = float
    if for_main_pretrain:
        timm.__version__ = "0.3.2"  # item 4: main_pretrain.py asserts the version it was written for
        with warnings.catch_warnings():  # importing the old module path warns (deprecated, still there)
            warnings.simplefilter("ignore", FutureWarning)
            import timm.optim.optim_factory as optim_factory
        optim_factory.add_weight_decay = timm.optim.param_groups_weight_decay
        if not torch.cuda.is_available():  # item 5: their step ends with torch.cuda.synchronize()
            torch.cuda.synchronize = lambda device=None: None

    class BlockDroppingQkScale(tvit.Block):  # item 1
        def __init__(self, *args, qk_scale=None, **kwargs):
            super().__init__(*args, **kwargs)

    sys.path.insert(0, str(official))
    original = tvit.Block
    tvit.Block = BlockDroppingQkScale
    try:
        import models_mae
    finally:
        tvit.Block = original
    models_mae.mae_vit_tiny_patch4 = _tiny_factory(models_mae, arch)  # item 6
    return models_mae


def _tiny_factory(models_mae: types.ModuleType, arch: dict):
    """A factory like the official ``mae_vit_*`` ones, with mimkit's preset arguments as defaults.

    main_pretrain.py calls ``models_mae.__dict__[args.model](norm_pix_loss=...)`` without img_size,
    so the preset's 28 px must be the default here.
    """
    from torch import nn

    accepted = inspect.signature(models_mae.MaskedAutoencoderViT.__init__).parameters
    defaults = {k: v for k, v in arch.items() if k in accepted}

    def mae_vit_tiny_patch4(**kwargs):
        return models_mae.MaskedAutoencoderViT(norm_layer=partial(nn.LayerNorm, eps=1e-6), **{**defaults, **kwargs})

    return mae_vit_tiny_patch4


def mimkit_arch() -> dict:
    """mimkit's tiny preset arguments (img_size, dims, decoder, mask_ratio, norm_pix_loss)."""
    from mimkit.registry import resolve_model_kwargs

    return dict(resolve_model_kwargs(TINY))


def official_runner(argv: list[str]) -> None:
    """``RUNNER OFFICIAL ARCH_JSON TIMING_FILE -- main_pretrain args``: their script, timed per epoch.

    Wrapping ``engine_pretrain.train_one_epoch`` before main_pretrain.py imports it times the epoch
    alone: dataset scan, model build and checkpoint saving stay outside.
    """
    official, arch, timing_file = Path(argv[0]), json.loads(argv[1]), Path(argv[2])
    script_args = argv[argv.index("--") + 1:]
    install_shims(official, arch, for_main_pretrain=True)
    import engine_pretrain
    import torch

    train_one_epoch = engine_pretrain.train_one_epoch

    def timed_train_one_epoch(model, data_loader, *args, **kwargs):
        start = time.perf_counter()
        stats = train_one_epoch(model, data_loader, *args, **kwargs)
        elapsed = time.perf_counter() - start
        record = {"epoch_time_s": elapsed, "steps": len(data_loader), "batch_size": data_loader.batch_size,
                  "images": len(data_loader) * data_loader.batch_size, "loss": stats.get("loss"),
                  "threads": torch.get_num_threads()}
        timing_file.write_text(json.dumps(record))
        return stats

    engine_pretrain.train_one_epoch = timed_train_one_epoch
    script = official / "main_pretrain.py"
    sys.argv = [str(script), *script_args]
    import runpy

    runpy.run_path(str(script), run_name="__main__")


# --- output -----------------------------------------------------------------------------------------

class Emitter:
    """Prints each JSON record and appends it to ``--out`` (opened up front so a bad path fails early)."""

    def __init__(self, out: str | None):
        self.file = None
        if out:
            path = Path(out)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.file = path.open("w")
            except OSError as exc:
                raise UserError(f"Cannot write --out {path} ({exc.strerror or exc}): choose a writable file.") from None

    def __call__(self, record: dict) -> dict:
        if not record.get("summary") and record.get("part") != "summary":
            # Shared cores: a 1-minute load above the thread count flags a disturbed measurement.
            record = {**record, "loadavg_1m": os.getloadavg()[0]}
        line = json.dumps(record)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        return record


def _ratio_summary(records: list[dict], **key) -> dict:
    """Median images/s of each implementation over the rounds, and mimkit / official."""
    med = {impl: statistics.median(r["images_per_s"] for r in records if r["impl"] == impl)
           for impl in ("official", "mimkit")}
    return {**key, "official_images_per_s": med["official"], "mimkit_images_per_s": med["mimkit"],
            "ratio_mimkit_over_official": med["mimkit"] / med["official"], "rounds": len(records) // 2}


# --- part 1: training-step speed ----------------------------------------------------------------------

def _step_models(models_mae, arch: dict, args):
    """(official model, its optimizer, mimkit model, its optimizer, same_initial_weights)."""
    import timm.optim
    import torch

    import mimkit
    from mimkit.config import TrainConfig
    from mimkit.engine.optim import build_optimizer

    torch.manual_seed(0)
    official = models_mae.mae_vit_tiny_patch4()
    ours = mimkit.create_model(TINY)
    n_off, n_ours = (sum(p.numel() for p in m.parameters()) for m in (official, ours))
    assert n_off == n_ours, f"parameter counts differ: official {n_off}, mimkit {n_ours}"
    try:  # start from the same weights when the state dicts line up (mimkit says they do)
        ours.load_state_dict(official.state_dict())
        same_weights = True
    except RuntimeError:
        same_weights = False
    lr = args.blr * args.batch_size / 256
    t_cfg = dataclasses.replace(TrainConfig(), weight_decay=0.05, betas=[0.9, 0.95], optimizer="adamw")
    opt_ours = build_optimizer(ours, t_cfg, lr)
    opt_off = torch.optim.AdamW(timm.optim.param_groups_weight_decay(official, 0.05), lr=lr, betas=(0.9, 0.95))
    return official, opt_off, ours, opt_ours, n_off, same_weights


def part_step(official_dir: Path, args, emit: Emitter) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    arch = mimkit_arch()
    models_mae = install_shims(official_dir, arch)
    official, opt_off, ours, opt_ours, n_params, same_weights = _step_models(models_mae, arch, args)
    mask_ratio = arch["mask_ratio"]
    images = torch.randn(args.batch_size, arch["in_chans"], arch["img_size"], arch["img_size"],
                         generator=torch.Generator().manual_seed(0))
    impls = {  # each: (loss of one forward, optimizer)
        "official": (lambda: official(images, mask_ratio=mask_ratio)[0], opt_off),
        "mimkit": (lambda: ours(images).loss, opt_ours),
    }
    official.train()
    ours.train()

    def timed(impl: str, steps: int, dtype) -> float:
        forward, opt = impls[impl]
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = forward()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return steps * args.batch_size / (time.perf_counter() - start)

    summaries = {}
    for precision in args.precisions:
        dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
        for impl in impls:  # kernels, allocator and optimizer state warm for this precision
            timed(impl, args.warmup, dtype)
        records = []
        for rnd in range(args.rounds):
            for impl in impls:  # alternating, so drift of the shared cores hits both
                records.append(emit({"part": "step", "precision": precision, "impl": impl, "round": rnd,
                                     "steps": args.steps, "images_per_s": timed(impl, args.steps, dtype)}))
        summaries[precision] = emit({"part": "step", "summary": True, **_ratio_summary(records, precision=precision),
                                     "params": n_params, "same_initial_weights": same_weights,
                                     "batch_size": args.batch_size, "threads": torch.get_num_threads()})
    return summaries


# --- part 2: one epoch end to end on BloodMNIST ---------------------------------------------------------

def write_image_folder(npz: Path, work: Path, max_images: int | None, batch_size: int) -> tuple[Path, int]:
    """BloodMNIST train images [:N] as ``ROOT/train/<label>/<i>.png`` (once); N = whole batches."""
    import numpy as np
    from PIL import Image

    if not npz.is_file():
        raise UserError(f"--data {npz} does not exist: give BloodMNIST's .npz (keys train_images, train_labels).")
    with np.load(npz) as data:
        if "train_images" not in data or "train_labels" not in data:
            raise UserError(f"--data {npz} has no train_images / train_labels arrays: give a MedMNIST .npz.")
        total = len(data["train_labels"])
        n = min(total, max_images or total) // batch_size * batch_size
        if n == 0:
            raise UserError(f"--max-images / --data give fewer images than one batch of {batch_size}.")
        root, marker = work / f"bloodmnist_train_{n}", work / f"bloodmnist_train_{n}.complete"
        if marker.is_file():
            return root, n
        images, labels = data["train_images"][:n], data["train_labels"][:n].reshape(-1)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / "train" / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    marker.touch()
    return root, n


def _thread_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _run_logged(command: list[str], env: dict, log: Path, what: str) -> None:
    """Run ``command`` with its output in ``log``; a failure ends the benchmark with the log's tail."""
    with log.open("w") as f:
        code = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent).returncode
    if code:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"{what} failed with exit status {code} (log {log}):\n{tail}")


def run_official(official: Path, arch: dict, root: Path, run: Path, workers: int, args) -> dict:
    """One epoch of the official main_pretrain.py on ``root`` (their ImageFolder wants root/train)."""
    timing = run / "timing.json"
    script_args = ["--model", TINY, "--input_size", str(arch["img_size"]), "--batch_size", str(args.batch_size),
                   "--epochs", "1", "--warmup_epochs", "1", "--mask_ratio", str(arch["mask_ratio"]),
                   "--blr", str(args.blr), "--weight_decay", "0.05", "--device", "cpu",
                   "--num_workers", str(workers), "--no_pin_mem", "--data_path", str(root),
                   "--output_dir", str(run), "--log_dir", str(run / "tb")]
    if arch["norm_pix_loss"]:
        script_args.append("--norm_pix_loss")
    command = [sys.executable, str(Path(__file__).resolve()), RUNNER, str(official), json.dumps(arch), str(timing),
               "--", *script_args]
    _run_logged(command, _thread_env(args.threads), run / "output.txt", "the official main_pretrain.py")
    record = json.loads(timing.read_text())
    return {**record, "images_per_s": record["images"] / record["epoch_time_s"]}


def _has_data_key(name: str) -> bool:
    from mimkit.config import DataConfig

    return name in {f.name for f in dataclasses.fields(DataConfig)}


def mimkit_command() -> list[str]:
    """The ``mimkit`` console script of this interpreter's environment (or ``python -m mimkit``)."""
    script = Path(sys.executable).parent / "mimkit"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mimkit"]


def mimkit_overrides(arch: dict, root: Path, out: Path, workers: int, args) -> list[str]:
    """``mimkit pretrain`` key=value overrides matching the official command line, then ``--mimkit-arg``."""
    overrides = [f"model.name={TINY}", f"model.mask_ratio={arch['mask_ratio']}", f"data.path={root}",
                 "data.split=train", f"data.mean={IMAGENET_MEAN}", f"data.std={IMAGENET_STD}",
                 f"train.batch_size={args.batch_size}", "train.epochs=1", "train.warmup_epochs=1",
                 f"train.blr={args.blr}", "train.weight_decay=0.05", "train.precision=fp32", "train.device=cpu",
                 "train.progress=false", "train.resume=false", f"output_dir={out}"]
    if _has_data_key("num_workers"):
        overrides.append(f"data.num_workers={workers}")
    return overrides + args.mimkit_arg  # last: a user's KEY=VALUE wins


def check_mimkit_args(arch: dict, args) -> None:
    """A misspelt or ill-typed ``--mimkit-arg`` is a user error, caught before any image is written."""
    from mimkit.config import load_config
    from mimkit.errors import MimkitError

    try:
        load_config(None, mimkit_overrides(arch, Path(args.work_dir), Path(args.work_dir), max(args.workers), args))
    except MimkitError as err:
        raise UserError(f"--mimkit-arg: {err}") from None


def run_mimkit(arch: dict, root: Path, run: Path, workers: int, args) -> dict:
    """One epoch of ``mimkit pretrain`` on ``root``; times from the epoch record of its log.jsonl."""
    out = run / "mimkit"
    overrides = mimkit_overrides(arch, root, out, workers, args)
    _run_logged([*mimkit_command(), "pretrain", *overrides], _thread_env(args.threads), run / "output.txt",
                "mimkit pretrain")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    epoch = [r for r in records if r.get("kind") == "epoch"][-1]
    return {"epoch_time_s": epoch["epoch_time_s"], "steps": epoch["step"],
            "images": epoch["step"] * args.batch_size, "loss": epoch.get("loss"),
            "images_per_s": epoch["images_per_s"]}


def part_e2e(official_dir: Path, args, emit: Emitter) -> dict:
    arch = mimkit_arch()
    check_mimkit_args(arch, args)
    work = Path(args.work_dir).expanduser().resolve()
    root, n = write_image_folder(Path(args.data).expanduser(), work, args.max_images, args.batch_size)
    if not _has_data_key("num_workers"):
        print("note: this mimkit has no data.num_workers key, so its worker count is its own default.", flush=True)
    runners = {"official": lambda run, w: run_official(official_dir, arch, root, run, w, args),
               "mimkit": lambda run, w: run_mimkit(arch, root, run, w, args)}
    summaries = {}
    for workers in args.workers:
        records = []
        for rnd in range(args.e2e_rounds):
            for impl, runner in runners.items():  # alternating: official, mimkit, official, ...
                run = work / "runs" / f"{impl}_w{workers}_r{rnd}"
                shutil.rmtree(run, ignore_errors=True)
                run.mkdir(parents=True)
                result = runner(run, workers)
                if not args.keep_runs:  # checkpoints are ~70 MB a run
                    shutil.rmtree(run, ignore_errors=True)
                records.append(emit({"part": "e2e", "impl": impl, "workers": workers, "round": rnd,
                                     "images_in_folder": n, **result}))
        steps = {r["impl"]: r["steps"] for r in records}
        summaries[str(workers)] = emit({
            "part": "e2e", "summary": True, **_ratio_summary(records, workers=workers), "images_in_folder": n,
            "steps_official": steps["official"], "steps_mimkit": steps["mimkit"],
            "same_steps": steps["official"] == steps["mimkit"], "threads": args.threads,
            "mimkit_args": args.mimkit_arg})
    return summaries


# --- command line -------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected whole numbers of 0 or more, got {text!r}")
    return values


def _precisions(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("fp32", "bf16") for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma list of fp32, bf16; got {text!r}")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return value


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-dir", required=True, help="checkout of facebookresearch/mae (outside this repo)")
    p.add_argument("--official-git", default=None, help="its git directory; extracted into --official-dir if missing")
    p.add_argument("--part", choices=["step", "e2e", "all"], default="all")
    p.add_argument("--out", default=None, help="write the JSON lines here too")
    p.add_argument("--threads", type=_positive, default=2, help="intra-op threads of every process")
    p.add_argument("--batch-size", type=_positive, default=128)
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr; lr = blr * batch / 256")
    g = p.add_argument_group("part step")
    g.add_argument("--precisions", type=_precisions, default=["fp32", "bf16"], help="comma list of fp32, bf16")
    g.add_argument("--warmup", type=_positive, default=5, help="untimed steps per implementation and precision")
    g.add_argument("--rounds", type=_positive, default=5, help="alternating timed blocks per implementation")
    g.add_argument("--steps", type=_positive, default=10, help="steps per timed block")
    g = p.add_argument_group("part e2e")
    g.add_argument("--data", default="/work/shared/datasets/bloodmnist.npz", help="BloodMNIST .npz")
    g.add_argument("--work-dir", default="/tmp/vs_official_mae", help="image folder and run folders")
    g.add_argument("--max-images", type=_positive, default=None, help="first N train images (rounded to batches)")
    g.add_argument("--workers", type=_int_list, default=[0, 2], help="DataLoader worker counts, e.g. 0,2")
    g.add_argument("--e2e-rounds", type=_positive, default=2, help="alternating epochs per implementation and W")
    g.add_argument("--mimkit-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra mimkit pretrain override, e.g. data.in_memory=false (repeatable)")
    g.add_argument("--keep-runs", action="store_true", help="keep run folders (checkpoints, logs) under --work-dir")
    return p.parse_args()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == RUNNER:
        official_runner(sys.argv[2:])
        return
    args = parse_args()
    bad = [a for a in args.mimkit_arg if "=" not in a]
    try:
        if bad:
            raise UserError(f"--mimkit-arg takes KEY=VALUE (e.g. data.in_memory=false), got {bad[0]!r}.")
        official = prepare_official(args.official_dir, args.official_git)
        emit = Emitter(args.out)
        import numpy as np
        import timm
        import torch

        summary = {"part": "summary", "official_dir": str(official),
                   "official_commit": official_commit(args.official_git), "torch": torch.__version__,
                   "timm": timm.__version__, "numpy": np.__version__,
                   "threads": args.threads, "batch_size": args.batch_size}
        if args.part in ("step", "all"):
            summary["step"] = part_step(official, args, emit)
        if args.part in ("e2e", "all"):
            summary["e2e"] = part_e2e(official, args, emit)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    emit(summary)


if __name__ == "__main__":
    main()
