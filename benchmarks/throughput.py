"""Train-step throughput of a MAE preset: images/s and peak memory, eager vs compiled, fp32 vs bf16.

Each configuration runs in a fresh subprocess so peak memory is its own. One full training step
(forward, backward, AdamW step) on random images; the first ``--warmup`` steps (compilation,
allocator warm-up) are not timed. Prints one JSON object per configuration, then a summary.

    python benchmarks/throughput.py --model mae_vit_tiny_patch4 --img-size 28 --batch-size 128
    python benchmarks/throughput.py --model mae_vit_base_patch16 --batch-size 256 --device cuda
    python benchmarks/throughput.py --configs eager-fp32 --model-arg decoder_num_heads=1   # a preset variant

``--impl reference`` reproduces the official MAE code's compute path for comparison: explicit
(unfused) softmax attention as in timm 0.3.2 and the for-loop AdamW of torch 1.x, fp32 eager.

On CUDA the script also reports model FLOPs utilisation (MFU): model FLOPs of the step
(forward x3, counted with torch.utils.flop_counter) divided by the GPU's dense bf16/fp32 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# Dense peak TFLOP/s (no sparsity) by device name substring, for MFU.
_PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "fp32": 67.0},
                "A100": {"bf16": 312.0, "fp32": 19.5}}


def _model_overrides(pairs: list[str]) -> dict:
    """``["decoder_depth=8", ...]`` -> ``{"decoder_depth": 8}``, values parsed as in config overrides."""
    from mimkit.config import parse_override
    from mimkit.errors import ConfigError

    overrides = {}
    for pair in pairs:
        keys, value = parse_override(pair)
        if len(keys) != 1:
            raise ConfigError(f"--model-arg takes a create_model argument such as decoder_depth=8, got {pair!r}")
        overrides[keys[0]] = value
    return overrides


def _single(args) -> dict:
    import torch

    import mimkit
    from mimkit.engine.optim import param_groups

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = mimkit.create_model(args.model, img_size=args.img_size, norm_pix_loss=True,
                                **args.model_overrides).to(device)
    if args.impl == "reference":
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), foreach=False)
    else:
        try:
            opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
        except RuntimeError:
            opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    step_model = torch.compile(model) if args.compile else model
    images = torch.randn(args.batch_size, model.in_chans, args.img_size, args.img_size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = step_model(images).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    result = {
        "model": args.model, "model_args": args.model_overrides, "img_size": args.img_size,
        "batch_size": args.batch_size, "device": str(device),
        "impl": args.impl, "compile": args.compile, "precision": args.precision,
        "images_per_s": args.batch_size / median, "step_ms_median": 1000 * median,
        "step_ms_min": 1000 * times[0], "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(images).loss.backward()
        opt.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()  # forward + backward of this step
        peak = next((v for k, v in _PEAK_TFLOPS.items() if k in result["gpu"]), None)
        result["tflops_per_step"] = flops / 1e12
        result["achieved_tflops"] = flops / median / 1e12
        if peak:
            result["mfu"] = result["achieved_tflops"] / peak["bf16" if dtype is not None else "fp32"]
    else:
        # ru_maxrss is the process's peak resident memory in KiB (Linux).
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_tiny_patch4")
    p.add_argument("--img-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a create_model argument, e.g. decoder_num_heads=1 (repeatable)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default="eager-fp32,eager-bf16,compiled-fp32,compiled-bf16",
                   help="comma list of {eager,compiled}-{fp32,bf16,fp16} and/or reference")
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="mimkit", choices=["mimkit", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    from mimkit.errors import MimkitError
    from mimkit.registry import resolve_model_kwargs

    try:  # a malformed or unknown --model-arg fails here, before any subprocess
        args.model_overrides = _model_overrides(args.model_arg)
        resolved = resolve_model_kwargs(args.model, **args.model_overrides)
    except MimkitError as err:
        raise SystemExit(f"error: {err}") from None
    if args.img_size is None:
        args.img_size = resolved["img_size"]
    if args.single:
        print(json.dumps(_single(args)), flush=True)
        return

    results = []
    for spec in args.configs.split(","):
        extra = ["--impl", "reference"] if spec == "reference" else [
            "--precision", spec.split("-")[1]] + (["--compile"] if spec.startswith("compiled") else [])
        cmd = [sys.executable, os.path.abspath(__file__), "--single", "--model", args.model, "--img-size",
               str(args.img_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device, *extra,
               *(f"--model-arg={pair}" for pair in args.model_arg)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            result = {"config": spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
        else:
            result = {"config": spec, **json.loads(proc.stdout.strip().splitlines()[-1])}
        results.append(result)
        print(json.dumps(result), flush=True)
    base = next((r for r in results if r["config"] in ("reference", "eager-fp32") and "images_per_s" in r), None)
    if base:
        print(json.dumps({"summary": {r["config"]: round(r["images_per_s"] / base["images_per_s"], 3)
                                      for r in results if "images_per_s" in r}, "relative_to": base["config"]}))


if __name__ == "__main__":
    main()
