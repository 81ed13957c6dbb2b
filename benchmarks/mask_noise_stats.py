"""Statistics of the per-sample MAE masks the engine draws, against torch.rand (prints JSON).

Checks that the counter-based noise (mimkit.masking.sample_uniform on engine seeds) behaves like
independent uniform noise: every patch masked equally often, no correlation between patches, and
fresh masks each epoch.

    python benchmarks/mask_noise_stats.py --num-samples 11959 --num-patches 49 --mask-ratio 0.75
"""

from __future__ import annotations

import argparse
import json

import torch

from mimkit.engine.sampling import sample_seed
from mimkit.masking import num_visible, random_masking, sample_uniform


def max_offdiag_corr(x: torch.Tensor) -> float:
    """Largest |correlation| between two different columns of x [N, L]."""
    c = torch.corrcoef(x.T.double())
    c.fill_diagonal_(0)
    return float(c.abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=11959)  # BloodMNIST train split
    p.add_argument("--num-patches", type=int, default=49)  # 28 px / patch 4 -> 7x7 grid
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--run-seed", type=int, default=0)
    args = p.parse_args()
    n, length = args.num_samples, args.num_patches
    masks = []
    for epoch in (0, 1):
        seeds = torch.tensor([sample_seed(args.run_seed, epoch, i) for i in range(n)])
        masks.append(random_masking(n, length, args.mask_ratio, noise=sample_uniform(seeds, length)).mask)
    reference = random_masking(n, length, args.mask_ratio, noise=torch.rand(n, length)).mask
    k = num_visible(length, args.mask_ratio)
    visible0, visible1 = 1 - masks[0], 1 - masks[1]
    print(json.dumps({
        "num_samples": n, "num_patches": length, "mask_ratio": args.mask_ratio,
        "per_patch_mask_frequency": [round(float(masks[0].mean(0).min()), 4), round(float(masks[0].mean(0).max()), 4)],
        "max_abs_corr_between_patches": round(max_offdiag_corr(masks[0]), 4),
        "max_abs_corr_between_patches_torch_rand": round(max_offdiag_corr(reference), 4),
        "visible_overlap_epoch0_vs_epoch1": round(float((visible0 * visible1).sum(1).mean()), 3),
        "visible_overlap_expected": k * k / length,
    }))


if __name__ == "__main__":
    main()
