"""Epoch time of the full training loop at two git revisions, alternating runs: a regression check.

    python benchmarks/epoch_time_ab.py --base 390be2b --data ../shared/datasets/bloodmnist.npz \
        --rounds 2 --out benchmarks/results/epoch_time_ab_bloodmnist.json

Each revision is checked out once into a temporary worktree (``git worktree``) and run with this
checkout's Python environment: ``mimkit pretrain`` with the 28-px MAE recipe for one epoch (by
default bf16), in a fresh process per run, runs alternating base, head, base, head ... so drift
on a shared machine hits both. Reports the epoch's images/s from each run's ``log.jsonl`` and the
ratio head / base. Extra ``--arg KEY=VALUE`` overrides go to both revisions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _worktree(rev: str, parent: Path) -> Path:
    path = parent / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), rev], check=True,
                   capture_output=True)
    return path


def _epoch_rate(source: Path, out: Path, args) -> float:
    """One fresh run of ``source`` (a checkout) for one epoch; its epoch images/s."""
    argv = [sys.executable, "-m", "mimkit", "pretrain", "--config", str(source / "configs/mae/vit_tiny_p4_28.yaml"),
            f"data.path={Path(args.data).resolve()}", f"output_dir={out}", "train.epochs=1", "train.resume=false",
            "train.progress=false", f"train.precision={args.precision}", *args.arg]
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(argv, cwd=source, env=env, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return next(r["images_per_s"] for r in records if r["kind"] == "epoch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arg", action="append", default=[], help="extra KEY=VALUE override for both")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"epoch_time_ab: error: {args.data} does not exist: pass a .npz file or an image folder.", file=sys.stderr)
        return 2
    rates: dict[str, list[float]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": _worktree(args.base, Path(tmp)), "head": _worktree(args.head, Path(tmp))}
        try:
            for r in range(args.rounds):
                for name, tree in trees.items():
                    rates[name].append(_epoch_rate(tree, Path(tmp) / f"run_{name}_{r}", args))
                    print(f"{name} round {r + 1}: {rates[name][-1]:.1f} img/s", file=sys.stderr, flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    report = {"benchmark": "epoch_time_ab", "base": args.base, "head": args.head, "data": args.data,
              "precision": args.precision, "threads": args.threads, "images_per_s": rates,
              "median": {k: statistics.median(v) for k, v in rates.items()},
              "ratio_head_over_base": statistics.median(rates["head"]) / statistics.median(rates["base"])}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
