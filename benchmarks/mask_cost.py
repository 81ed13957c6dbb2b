"""Cost of mask generation relative to a full iBOT training step, for every generator.

For each mask configuration it times, on the same batch of multi-crop views of real images:

* ``mask_ms``: drawing the masks of both global crops from the teacher's attention
  (:meth:`IBOT.draw_masks`: per-sample ratios, scores, top-k / blocks / hint sampling);
* ``attention_ms``: what recording the needed attention maps adds to the teacher forward
  (:func:`mimkit.attention.capture_attention`: the requested blocks leave the fused kernel);
* ``step_ms``: a full training step (teacher forward, masks, student forward on all crops,
  backward, AdamW, EMA update) with that configuration;

and reports ``(mask_ms + attention_ms) / step_ms`` in percent. It also times a training step of
the MAE preset of the same size on the same images (``--mae-model``), so iBOT's images/s can be
compared with MAE's. Prints one JSON object.

    python benchmarks/mask_cost.py --data ../shared/datasets/bloodmnist.npz --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

CONFIGS = {
    "random": dict(mask_strategy="random"),
    "block": dict(mask_strategy="block"),
    "attmask_high (raw, last block)": dict(mask_strategy="attmask_high", mask_scores="raw"),
    "attmask_hint (raw, last block)": dict(mask_strategy="attmask_hint", mask_scores="raw"),
    "attmask_low (raw, last block)": dict(mask_strategy="attmask_low", mask_scores="raw"),
    "attmask_high (log, blocks 11/4)": dict(mask_strategy="attmask_high", mask_scores="log", mask_layers=[11, 4]),
    "attmask_high (power 0.5)": dict(mask_strategy="attmask_high", mask_scores="power"),
    "attmask_high (rollout_all)": dict(mask_strategy="attmask_high", mask_scores="rollout_all"),
    "attmask_high (rollout_last)": dict(mask_strategy="attmask_high", mask_scores="rollout_last"),
}


def _time(fn, repeats: int) -> float:
    """Fastest wall time of fn() in milliseconds (the minimum is the estimate least disturbed by other load)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def _time_difference(fn_with, fn_without, repeats: int) -> float:
    """Extra milliseconds of fn_with over fn_without, timed alternately so both see the same load."""
    fn_with(), fn_without()
    with_t, without_t = [], []
    for _ in range(repeats):
        for fn, times in ((fn_with, with_t), (fn_without, without_t)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return max(0.0, min(with_t) - min(without_t))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/datasets/bloodmnist.npz")
    p.add_argument("--model", default="ibot_vit_tiny_patch4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--mask-repeats", type=int, default=20)
    p.add_argument("--step-repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="subset of configuration names")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="autocast of the training steps")
    p.add_argument("--mae-model", default="mae_vit_tiny_patch4", help="MAE preset timed for comparison ('' to skip)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mimkit.attention import capture_attention
    from mimkit.config import DataConfig
    from mimkit.data import compute_channel_stats, load_dataset
    from mimkit.engine.optim import build_adamw
    from mimkit.registry import create_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ds = load_dataset(args.data, "train")
    mean, std = compute_channel_stats(ds)
    n = args.batch_size
    results = {}
    for name, overrides in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        model = create_model(args.model, in_chans=ds.num_channels, mask_prob=1.0, **overrides).to(device)
        transform = model.pretrain_transform(model.img_size, mean, std, DataConfig())
        views = [transform(ds[i][0]) for i in range(n)]
        crops = [torch.stack(v).to(device) for v in zip(*views)]
        seeds = torch.arange(n, device=device)
        globals_ = torch.cat(crops[:2])
        layers = model.attention_layers_needed()
        with torch.no_grad(), capture_attention(model.teacher, layers) as attentions:
            model.teacher.encode(globals_)

        def draw():
            model.draw_masks(attentions, n, seeds, device)
            sync()

        def teacher(with_attention: bool):
            with torch.no_grad(), capture_attention(model.teacher, layers if with_attention else []):
                model.teacher.encode(globals_)
            sync()

        optimizer = build_adamw(model, 1e-4, 0.04, (0.9, 0.999))

        def step():
            with autocast:
                out = model(crops, sample_seeds=seeds)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.after_optimizer_step(0.5)
            sync()

        mask_ms = _time(draw, args.mask_repeats)
        attention_ms = 0.0
        if layers:
            attention_ms = _time_difference(lambda: teacher(True), lambda: teacher(False), 2 * args.step_repeats + 3)
        step_ms = _time(step, args.step_repeats)
        results[name] = {
            "mask_ms": round(mask_ms, 2), "attention_ms": round(attention_ms, 2), "step_ms": round(step_ms, 1),
            "mask_percent_of_step": round(100 * (mask_ms + attention_ms) / step_ms, 2),
            "attention_blocks": layers, "step_images_per_s": round(n / step_ms * 1e3, 1),
        }
        print(name, results[name], flush=True)
    mae = None
    if args.mae_model:
        torch.manual_seed(0)
        mae_model = create_model(args.mae_model, in_chans=ds.num_channels, norm_pix_loss=True).to(device)
        mae_optimizer = build_adamw(mae_model, 1e-4, 0.05, (0.9, 0.95))
        images = crops[0]

        def mae_step():
            with autocast:
                out = mae_model(images, sample_seeds=seeds)
            out.loss.backward()
            mae_optimizer.step()
            mae_optimizer.zero_grad(set_to_none=True)
            sync()

        mae_ms = _time(mae_step, args.step_repeats + 2)
        mae = {"model": args.mae_model, "step_ms": round(mae_ms, 1), "step_images_per_s": round(n / mae_ms * 1e3, 1)}
        for r in results.values():
            r["step_cost_vs_mae"] = round(r["step_ms"] / mae_ms, 2)
        print("MAE", mae, flush=True)
    print(json.dumps({
        "model": args.model, "batch_size": n, "precision": args.precision, "data": args.data, "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "results": results, "mae": mae,
    }))


if __name__ == "__main__":
    main()
