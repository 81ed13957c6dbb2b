"""DDMIM (methods.md §3): stage masks, the EMA teacher's pace, each loss term against a hand
computation, the seed-compatibility switches, and a run through the engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from mimkit.cli import main
from mimkit.errors import ConfigError
from mimkit.masking import bernoulli_token_mask, subsample_mask
from mimkit.methods.ddmim import DDMIM, info_nce, masked_smooth_l1, perceptual_losses
from mimkit.methods.ema import copy_into_teacher_, ema_update_
from mimkit.registry import create_model

# 32 px, patch 2: stage grids 16 -> 8 -> 4 (3 stages, window 4), two masked stages.
TINY = dict(img_size=32, patch_size=2, in_chans=3, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 2),
            window_size=4, version=1, drop_path_rate=0.0, embed_dim_out=16, projector_dim=8)


def _huber(d: float) -> float:
    """SmoothL1 with beta 1 of one difference, by its definition."""
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


# -- masks ---------------------------------------------------------------------------------------
def test_stage_masks_are_the_nearest_neighbour_subsample_of_the_first_mask():
    torch.manual_seed(0)
    model = DDMIM(**TINY)
    mask = model.draw_mask(torch.zeros(3, 3, 32, 32), torch.tensor([5, 6, 7]))  # [3, 256]
    keep = model.stage_keep(mask)
    assert [k.shape for k in keep] == [(3, 16, 16, 1), (3, 8, 8, 1)]
    fine = mask.reshape(3, 16, 16)
    for s, k in enumerate(keep):
        f = 2**s
        for n in range(3):
            for i in range(16 // f):
                for j in range(16 // f):  # coarse (i, j) takes fine (i f, j f), kept where not masked
                    assert bool(k[n, i, j, 0]) == (not bool(fine[n, i * f, j * f]))


def test_bernoulli_token_mask_has_the_probability_and_is_seeded_per_sample():
    seeds = torch.arange(40)
    mask = bernoulli_token_mask(seeds, 40, (16, 16), 0.3)
    assert mask.dtype == torch.bool and mask.shape == (40, 256)
    # 10 240 independent tokens at p = 0.3: the fraction is within 4 standard deviations (0.018)
    assert abs(mask.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 10240)
    assert len({int(c) for c in mask.sum(1)}) > 1  # per-token draws: counts vary per image
    alone = bernoulli_token_mask(seeds[7:8], 1, (16, 16), 0.3)
    assert torch.equal(alone[0], mask[7])  # row n depends on its own seed only


def test_subsample_mask_refuses_a_grid_that_does_not_divide():
    with pytest.raises(ValueError, match="does not subsample"):
        subsample_mask(torch.zeros(1, 36, dtype=torch.bool), (6, 6), 4)


def test_student_never_sees_the_pixels_of_masked_tokens():
    """Masked stage inputs are zero vectors: changing masked patches' pixels changes no student output."""
    torch.manual_seed(0)
    model = DDMIM(**TINY).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = model.draw_mask(images, torch.tensor([1, 2]))
    pixel_mask = mask.reshape(2, 1, 16, 16).repeat_interleave(2, 2).repeat_interleave(2, 3)
    changed = images + 5 * torch.randn_like(images) * pixel_mask
    with torch.no_grad():
        a, _ = model.student_pass(images, mask)
        b, _ = model.student_pass(changed, mask)
        c, _ = model.student_pass(changed, torch.zeros_like(mask))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.stages, b.stages))
    assert torch.allclose(a.embedding, b.embedding, atol=1e-5)
    assert not torch.allclose(a.normed, c.normed, atol=1e-3)  # unmasked, the change shows


# -- EMA -----------------------------------------------------------------------------------------
def test_ema_update_equals_the_formula_and_skips_parameters_the_teacher_lacks():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    student.extra = nn.Parameter(torch.ones(1))  # a student-only parameter (e.g. a mask token)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_([(teacher, student)], 0.9)
    for name, value in teacher.state_dict().items():
        assert torch.allclose(value, 0.9 * before[name] + 0.1 * student.state_dict()[name], atol=1e-7)
    copy_into_teacher_([(teacher, student)])
    assert torch.equal(teacher.weight, student.weight)
    with pytest.raises(KeyError, match="no parameter"):
        ema_update_([(student, teacher)], 0.9)  # the "teacher" here has `extra`, its student does not


def test_ddmim_teacher_copies_at_step_zero_then_follows_every_ema_every_steps():
    torch.manual_seed(0)
    model = DDMIM(**TINY, ema_every=3, ema_decay=0.5)
    student = model.encoder.patch_embed.proj.bias
    teacher = model.teacher.patch_embed.proj.bias
    expected = teacher.detach().clone()
    for step in range(8):
        with torch.no_grad():
            student.add_(torch.randn_like(student))  # "an optimizer step"
        model.after_optimizer_step(step / 8)
        if step == 0:
            expected = student.detach().clone()  # the first update copies
        elif step % 3 == 0:
            expected = 0.5 * expected + 0.5 * student.detach()
        assert torch.allclose(teacher, expected, atol=1e-6), step
    assert int(model.optimizer_steps) == 8 and int(model.teacher_updates) == 3  # steps 0, 3, 6
    assert {"optimizer_steps", "teacher_updates"} <= set(model.state_dict())  # resumed with the run


# -- loss terms ----------------------------------------------------------------------------------
def test_perceptual_loss_is_the_mean_smooth_l1_of_each_stage():
    s = [torch.tensor([[0.0, 2.0]]), torch.tensor([[[1.0, 0.5]]])]
    t = [torch.tensor([[0.5, 0.0]]), torch.tensor([[[-1.0, 0.5]]])]
    expected = [(_huber(-0.5) + _huber(2.0)) / 2, (_huber(2.0) + _huber(0.0)) / 2]
    assert perceptual_losses(s, t).tolist() == pytest.approx(expected)


def test_masked_smooth_l1_normalises_by_masked_pixels_or_by_all():
    pred = torch.tensor([[[[0.0, 3.0], [1.0, 0.2]]], [[[1.0, 1.0], [1.0, 1.0]]]]).expand(2, 2, 2, 2).clone()
    pred[:, 1] *= -1  # two channels that differ
    target = torch.zeros(2, 2, 2, 2)
    pixel_mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 1.0]]]])
    masked_errors = [_huber(v) for v in (0.0, 3.0, 1.0)] * 2  # image 0: two pixels, image 1: one; x 2 channels
    total = sum(masked_errors)
    assert masked_smooth_l1(pred, target, pixel_mask).item() == pytest.approx(total / (3 * 2 + 1e-5))
    assert masked_smooth_l1(pred, target, pixel_mask, mean_over_all_pixels=True).item() == pytest.approx(total / 16)


def test_info_nce_equals_a_hand_computed_cross_entropy_in_both_conventions():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    tau = 0.5
    cos = [[float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) for b in t.numpy()] for a in s.numpy()]

    def ce(logits: list[float], target: int) -> float:
        return -logits[target] + math.log(sum(math.exp(x) for x in logits))

    intended = sum(ce([c / tau for c in row], n) for n, row in enumerate(cos)) / 3
    seed = sum(ce([cos[n][n] / tau] + [(0.0 if m == n else cos[n][m]) / tau for m in range(3)], 0)
               for n in range(3)) / 3
    assert info_nce(s, t, tau).item() == pytest.approx(intended, rel=1e-6)
    assert info_nce(s, t, tau, self_in_denominator=True).item() == pytest.approx(seed, rel=1e-6)
    assert seed != pytest.approx(intended)


def test_total_loss_is_the_weighted_sum_of_the_terms():
    torch.manual_seed(0)
    model = DDMIM(**TINY, stage_weights=(1.0, 0.5, 0.1), contrastive_weight=0.3)
    images = torch.randn(4, 3, 32, 32)
    mask = model.draw_mask(images, torch.arange(4))
    terms = model.losses(images, mask)
    p = terms["perceptual"]
    assert p.shape == (3,) and (p > 0).all()  # the masked student differs from the teacher at every stage
    expected = 1.0 * p[0] + 0.5 * p[1] + 0.1 * p[2] + terms["rec"] + 0.3 * terms["con"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    rec = model.reconstruct(images, mask=mask)
    assert rec.pred.shape == images.shape and rec.loss.item() == pytest.approx(terms["rec"].item(), rel=1e-6)
    assert torch.equal(rec.pixel_mask, terms["pixel_mask"])


def test_teacher_shares_student_modules_switch_uses_the_students_embedding_and_heads():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 256, dtype=torch.bool)
    for shared in (False, True):
        model = DDMIM(**TINY, teacher_shares_student_modules=shared).eval()
        _, tokens = model.student_pass(images, mask)
        before = model.teacher_pass(images, tokens).embedding
        with torch.no_grad():  # move the teacher's own embedding and head away from the student's
            # (random: a constant shift of every weight is removed by the layer norms)
            model.teacher.patch_embed.proj.weight.add_(torch.randn_like(model.teacher.patch_embed.proj.weight))
            model.teacher_head.weight.add_(torch.randn_like(model.teacher_head.weight))
        after = model.teacher_pass(images, tokens).embedding
        assert torch.allclose(before, after) == shared


def test_bad_ddmim_arguments_are_one_sentence_config_errors():
    with pytest.raises(ConfigError, match="one weight per stage"):
        DDMIM(**{**TINY, "stage_weights": (1.0, 0.1)})
    with pytest.raises(ConfigError, match="masked_stages=4"):
        DDMIM(**TINY, masked_stages=4)
    with pytest.raises(ConfigError, match="mask_prob"):
        DDMIM(**TINY, mask_prob=1.0)


def test_seed_preset_is_swin_v2_tiny_at_224_with_the_seed_heads():
    model = create_model("ddmim_swinv2_tiny_window7_224")
    enc = model.encoder
    assert (enc.version, enc.img_size, enc.patch_size, enc.window_size, enc.depths) == (2, 224, 4, 7, (2, 2, 6, 2))
    assert model.masked_stages == 3 and model.stage_weights == [1.0, 1.0, 1.0, 0.1]
    assert model.head.out_features == 1024 and model.projector[-1].out_features == 512
    assert model.decoder[0].out_channels == 32 * 32 * 3 and (model.tau, model.ema_decay, model.ema_every) == (
        0.05, 0.999, 32)


# -- through the engine --------------------------------------------------------------------------
def test_ddmim_pretrains_and_its_encoder_runs_knn_and_the_reconstruction_figure(tmp_path):
    from mimkit.config import load_config
    from mimkit.engine.trainer import pretrain

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 80)
    images = (rng.integers(0, 120, (80, 28, 28)) + 50 * labels[:, None, None]).astype(np.uint8)
    data = tmp_path / "tiny.npz"
    np.savez(data, train_images=images[:48], train_labels=labels[:48, None], val_images=images[48:64],
             val_labels=labels[48:64, None], test_images=images[64:], test_labels=labels[64:, None])
    out = tmp_path / "run"
    summary = pretrain(load_config(None, [
        "model.name=ddmim_swin_tiny_28", "model.embed_dim=16", "model.depths=[1,1]", "model.num_heads=[1,2]",
        "model.ema_every=2", f"data.path={data}", f"output_dir={out}", "train.epochs=1", "train.warmup_epochs=0",
        "train.batch_size=16", "train.progress=false"]))
    assert summary["final_epoch"] == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("perceptual0" in r and "con" in r for r in log)
    knn = tmp_path / "knn.json"
    assert main(["knn", "--checkpoint", str(out / "last.pt"), "--data", str(data), "--k", "5", "--out", str(knn)]) == 0
    assert json.loads(knn.read_text())["pool"] == "mean"
    assert main(["knn", "--checkpoint", str(out / "last.pt"), "--data", str(data), "--k", "5", "--encoder",
                 "teacher", "--out", str(tmp_path / "knn_t.json")]) == 0


def test_ddmim_configs_are_valid_and_the_seed_code_config_differs_only_by_the_switches():
    import yaml

    from mimkit.config import from_dict
    from mimkit.methods.ddmim import PRESET_ARGS
    from tests.conftest import REPO

    import inspect

    raw = {p.name: yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs" / "ddmim").glob("*.yaml"))}
    assert set(raw) == {"swin_tiny_28.yaml", "swinv2_tiny_224.yaml", "swinv2_tiny_224_seed_code.yaml"}
    for name, cfg in raw.items():
        cls, _, _ = PRESET_ARGS[cfg["model"]["name"]]
        assert set(cfg["model"]) - {"name"} <= set(inspect.signature(cls.__init__).parameters), name
        from_dict({k: v for k, v in cfg.items() if k != "model"})  # data / train keys and ranges
    seed, intended = raw["swinv2_tiny_224_seed_code.yaml"], raw["swinv2_tiny_224.yaml"]
    switches = {"contrastive_self_in_denominator", "teacher_shares_student_modules",
                "reconstruction_mean_over_all_pixels"}
    assert {k: v for k, v in seed["model"].items() if k not in switches} == intended["model"]
    assert all(seed["model"][k] is True for k in switches) and seed["train"] == intended["train"]
    # The seed's optimiser: AdamW lr 5e-3 absolute at batch 52, StepLR(20, 0.1), wd 1e-4, no warmup.
    t = from_dict({"train": intended["train"]}).train
    assert (t.lr, t.batch_size, t.lr_schedule, t.lr_milestones, t.lr_gamma, t.weight_decay, t.warmup_epochs) == (
        5e-3, 52, "multistep", [20, 40], 0.1, 1e-4, 0)
