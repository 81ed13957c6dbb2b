"""iBOT per-crop mask strategies: every pair of strategies, contrastive term on and off.

Each global crop has its own strategy, score and layer. The masks the student actually
receives are checked against what each crop's strategy means (block: a few contiguous
rectangles; attmask_high/low: the top/bottom patches of that crop's teacher score; hint: the
top patches minus a few revealed from the most-attended pool), and against a twin drawn from
the same per-sample noise.
"""

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from mimkit.config import load_config
from mimkit.engine.trainer import pretrain
from mimkit.masking import MASK_STRATEGIES, attention_scores, mask_noise_size, strategy_mask, uniform_noise
from mimkit.methods import ibot as ibot_module
from mimkit.registry import create_model

from .conftest import REPO, breast_multicrop, shared_file

TINY = dict(depth=2, embed_dim=64, num_heads=2, out_dim=64, patch_out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, num_local_crops=1)
# Different scores and blocks per crop: crop 1 reads block 0, crop 2 the last block.
PER_CROP = dict(mask_scores=["raw", "log"], mask_layers=[0, -1], mask_prob=1.0)
BATCH, GRID, LENGTH = 6, (7, 7), 49


def tiny_ibot(**kwargs):
    torch.manual_seed(0)
    return create_model("ibot_vit_tiny_patch4", in_chans=1, **{**TINY, **PER_CROP, **kwargs})


@pytest.fixture(scope="module")
def crops():
    """Multi-crop views [global_1, global_2, local_1] of 6 real BreastMNIST images."""
    return breast_multicrop(tiny_ibot(), BATCH)


def teacher_scores(model, globals_: torch.Tensor) -> list[torch.Tensor]:
    """Each crop's [N, L] score from its own rows of a separate teacher pass over all blocks."""
    with torch.no_grad():
        attn = model.teacher.encode(globals_, return_attention=True).attentions
    return [attention_scores({i: a[q * BATCH:(q + 1) * BATCH] for i, a in attn.items()}, model.mask_scores[q],
                             layer=model.mask_layers[q], depth=model.depth, power=model.mask_power)
            for q in range(2)]


def assert_block(mask: torch.Tensor) -> None:
    """A union of a few rectangles: at most 3 four-connected components per image (random: ~6)."""
    for row in mask:
        assert ndimage.label(row.view(GRID).numpy())[1] <= 3, row.view(GRID).int()


def assert_attmask(mask: torch.Tensor, score: torch.Tensor, mode: str, hint_pool: int = int(LENGTH * 0.1)) -> None:
    """high/low: the masked patches outrank (underrank) every visible one on this crop's score.

    hint: for some r = floor(0.1 (m + r)) revealed patches, the patches ranked [pool, m + r)
    are masked, those ranked >= m + r visible, and r of the top ``pool`` are revealed.
    """
    for row, s in zip(mask, score):
        masked, visible = s[row], s[~row]
        if mode == "high":
            assert masked.min() > visible.max()
        elif mode == "low":
            assert masked.max() < visible.min()
        else:
            m, by_rank = int(row.sum()), row[s.argsort(descending=True)]
            fits = [by_rank[hint_pool:m + r].all() and not by_rank[m + r:].any()
                    and int((~by_rank[:hint_pool]).sum()) == r
                    for r in range(3) if r == (m + r) // 10]  # m = 18 may be 19 - 1 or 20 - 2
            assert any(fits), by_rank.int()


def assert_follows(strategy: str, mask: torch.Tensor, score: torch.Tensor | None) -> None:
    if strategy == "block":
        assert_block(mask)
    elif strategy.startswith("attmask_"):
        assert_attmask(mask, score, strategy[len("attmask_"):])


def twin_mask(model, q: int, seeds: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Crop q's mask redrawn from its noise stream: count = floor(L (lo + (hi - lo) u0))."""
    strategy = model.mask_strategy[q]
    u = uniform_noise(seeds, BATCH, 2 + mask_noise_size(strategy, LENGTH), ibot_module._MASK_STREAM + q, "cpu")
    lo, hi = model.mask_ratio_range
    count = torch.floor(LENGTH * (lo + (hi - lo) * u[:, 0])).long()
    return strategy_mask(strategy, count, GRID, u[:, 2:], score, hint_ratio=model.hint_ratio)


class Spy:
    """Records what a callable was given, then calls it."""

    def __init__(self, fn, pick):
        self.fn, self.pick, self.seen = fn, pick, []

    def __call__(self, *args, **kwargs):
        self.seen.append(self.pick(*args, **kwargs))
        return self.fn(*args, **kwargs)


PAIRS = list(itertools.product(MASK_STRATEGIES, MASK_STRATEGIES))


@pytest.mark.parametrize("contrastive", [0.0, 0.5], ids=["contrastive_off", "contrastive_on"])
def test_every_pair_of_crop_strategies_trains_two_steps_with_masks_that_follow_each_strategy(
    crops, contrastive, monkeypatch
):
    """25 strategy pairs x 2 steps; the old code crashed on e.g. [block, attmask_high] without contrastive."""
    con_spy = Spy(ibot_module.attention_contrastive_loss, lambda s, t, scores, *a: scores)
    monkeypatch.setattr(ibot_module, "attention_contrastive_loss", con_spy)
    globals_ = torch.cat(crops[:2])
    for strategy in PAIRS:
        model = tiny_ibot(mask_strategy=list(strategy), contrastive_weight=contrastive)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        enc_spy = Spy(model.student.encode, lambda images, mask=None, **kw: mask)
        model.student.encode = enc_spy
        for step in range(2):
            seeds = torch.arange(BATCH) + 100 * step
            scores = teacher_scores(model, globals_)  # the teacher the step will use
            con_spy.seen.clear()
            enc_spy.seen.clear()
            out = model(crops, sample_seeds=seeds)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            model.after_optimizer_step(step / 10)
            assert torch.isfinite(out.loss), strategy
            masks = enc_spy.seen[0]  # the first student pass is the masked global crops
            for q in range(2):
                own = masks[q * BATCH:(q + 1) * BATCH]
                assert_follows(strategy[q], own, scores[q])
                assert torch.equal(own, twin_mask(model, q, seeds, scores[q])), (strategy, q)
            if contrastive:
                assert torch.allclose(con_spy.seen[0], torch.stack(scores), atol=1e-6)
            else:
                assert not con_spy.seen and "loss_contrastive" not in out.metrics


def test_assertions_tell_the_strategies_apart(crops):
    """The checks above would catch a crop given the wrong strategy."""
    model = tiny_ibot(mask_strategy="attmask_high")
    score = teacher_scores(model, torch.cat(crops[:2]))[0]
    seeds = torch.arange(BATCH)
    drawn = {}
    for strategy in MASK_STRATEGIES:
        model.mask_strategy = [strategy, strategy]
        drawn[strategy] = twin_mask(model, 0, seeds, score)
    # Each AttMask check rejects every other strategy's masks; the block check rejects random ones
    # (a contiguous top-attended region may pass as a block: the twin check tells those apart).
    for checked in ("attmask_high", "attmask_low", "attmask_hint"):
        for other in MASK_STRATEGIES:
            assert_follows(checked, drawn[checked], score)
            if other != checked:
                with pytest.raises(AssertionError):
                    assert_follows(checked, drawn[other], score)
    assert_follows("block", drawn["block"], score)
    with pytest.raises(AssertionError):
        assert_follows("block", drawn["random"], score)


def test_reported_crash_block_and_attmask_high_through_the_engine(tmp_path):
    """The issue's case: per-crop layers, contrastive off, 2 engine steps on BreastMNIST."""
    src = np.load(shared_file("breastmnist.npz"))
    small = tmp_path / "breast32.npz"
    np.savez(small, train_images=src["train_images"][:32], train_labels=src["train_labels"][:32])
    cfg = load_config(REPO / "configs/ibot/vit_tiny_p4_28.yaml", [
        *[f"model.{k}={v}" for k, v in TINY.items()], f"data.path={small}", f"output_dir={tmp_path / 'run'}",
        "model.mask_strategy=[block,attmask_high]", "model.mask_layers=[0,-1]", "model.contrastive_weight=0",
        "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=16", "train.progress=false",
        "train.precision=fp32",
    ])
    summary = pretrain(cfg)
    assert summary["final_epoch"] == 1 and np.isfinite(summary["final_loss"])
