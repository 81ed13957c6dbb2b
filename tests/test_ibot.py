"""iBOT: losses, teacher EMA, centring, schedules, attention-guided masks per crop, engine, CLI."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.engine.optim import param_groups
from mimkit.engine.trainer import pretrain
from mimkit.errors import ConfigError
from mimkit.loading import build_from_checkpoint, load_encoder
from mimkit.masking import attmask, attention_scores
from mimkit.methods.ibot import IBOT, attention_contrastive_loss
from mimkit.registry import create_model

from .conftest import REPO, breast_multicrop, shared_file

# Small enough for a CPU test: 2 blocks, 256-d head, 2 local crops.
TINY_IBOT = dict(depth=2, out_dim=256, patch_out_dim=256, head_hidden_dim=64, head_bottleneck_dim=32, num_local_crops=2)
TINY_IBOT_CLI = [f"model.{k}={v}" for k, v in TINY_IBOT.items()]


def tiny_ibot(**overrides) -> IBOT:
    torch.manual_seed(0)
    return create_model("ibot_vit_tiny_patch4", in_chans=1, **{**TINY_IBOT, **overrides})


@pytest.fixture(scope="module")
def breast_crops():
    """Multi-crop views of 6 real BreastMNIST images, as the engine's collate gives them."""
    return breast_multicrop(tiny_ibot(), 6)


def test_a_step_trains_the_student_only(breast_crops):
    model = tiny_ibot(mask_prob=1.0)
    out = model(breast_crops, sample_seeds=torch.arange(6))
    assert torch.isfinite(out.loss) and set(out.metrics) >= {"loss", "loss_cls", "loss_mim", "mask_ratio"}
    assert 0.1 <= out.metrics["mask_ratio"] <= 0.5
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters()) and all(p.grad is None for p in model.teacher_head.parameters())
    assert model.student.masked_embed.grad.abs().sum() > 0 and model.student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    optimised = {id(p) for g in param_groups(model, 0.04) for p in g["params"]}
    assert not optimised & {id(p) for p in [*model.teacher.parameters(), *model.teacher_head.parameters()]}
    assert model.eval_encoders()["teacher"] is model.teacher is model.encoder


def test_cls_and_mim_losses_match_their_definitions(breast_crops):
    model = tiny_ibot(mask_prob=1.0, mask_strategy="random").eval()  # eval: no drop-path, centres untouched
    model.center.normal_()
    model.patch_center.normal_()
    model.set_epoch(0.5)
    seeds = torch.arange(6)
    out = model(breast_crops, sample_seeds=seeds)
    tau_t, tau_tp = model.teacher_temperatures()
    assert math.isclose(tau_t, 0.055) and math.isclose(tau_tp, 0.055)  # half-way through the 1-epoch warm-up

    with torch.no_grad():
        g = torch.cat(breast_crops[:2])
        t_cls, t_patch = model.teacher_head(model.teacher.encode(g).tokens)
        masks, _ = model.draw_masks({}, 6, seeds, "cpu")
        s_cls, s_patch = model.student_head(model.student.encode(g, mask=masks).tokens)
        local_cls = [model.student_head.cls_logits(model.student.encode(x).tokens[:, 0]) for x in breast_crops[2:]]
    teacher = [F.softmax((t - model.center) / tau_t, -1) for t in t_cls.chunk(2)]
    student = [F.log_softmax(s / 0.1, -1) for s in [*s_cls.chunk(2), *local_cls]]
    pairs = [-(teacher[q] * student[v]).sum(-1).mean() for q in range(2) for v in range(len(student)) if v != q]
    assert torch.allclose(out.metrics["loss_cls"], torch.stack(pairs).mean(), atol=1e-5)

    p = F.softmax((t_patch - model.patch_center) / tau_tp, -1)
    ce = -(p * F.log_softmax(s_patch / 0.1, -1)).sum(-1)
    per_image = [(ce[i][masks[i]].mean() if masks[i].any() else torch.tensor(0.0)) for i in range(12)]
    assert torch.allclose(out.metrics["loss_mim"], torch.stack(per_image).mean(), atol=1e-5)


def contrastive_reference(student, teacher, scores, k: int, tau: float) -> float:
    """methods.md §5.4, intended InfoNCE form, one image and one pair at a time (float64).

    student, teacher: [Q, N, L, K] patch distributions; scores [Q, N, L]. For image t the anchors
    are the student's distributions at the k highest-scored patches of each crop (crop 1's first),
    the positives the teacher's at the same patches, the negatives the teacher's at each crop's
    k lowest-scored patches, all L2-normalised; every anchor i is paired with every positive j != i.
    """
    def unit(v):
        return v.double() / v.double().norm()

    terms = []
    for t in range(student.shape[1]):
        high, low = [], []
        for q in range(student.shape[0]):
            order = sorted(range(scores.shape[-1]), key=lambda l: -float(scores[q, t, l]))
            high += [(q, l) for l in order[:k]]
            low += [(q, l) for l in order[-k:]]
        anchors = [unit(student[q, t, l]) for q, l in high]
        positives = [unit(teacher[q, t, l]) for q, l in high]
        negatives = [unit(teacher[q, t, l]) for q, l in low]
        for i, a in enumerate(anchors):
            negative_mass = sum(math.exp(float(a @ n) / tau) for n in negatives)
            for j, p in enumerate(positives):
                if j != i:
                    positive = math.exp(float(a @ p) / tau)
                    terms.append(-math.log(positive / (positive + negative_mass)))
    return sum(terms) / len(terms)


def test_contrastive_term_equals_the_hand_computation():
    """Tiny fixed tensors (2 crops, 2 images, 5 patches, 3 classes, k = 2). A version that takes the
    anchors from the teacher (the original's no-gradient bug), keeps the i = j pairs, drops the
    temperature or the normalisation, or draws negatives from the most-attended patches differs."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 2, 5, 3, generator=g).softmax(-1).requires_grad_(True)
    teacher = torch.randn(2, 2, 5, 3, generator=g).softmax(-1)
    scores = torch.randperm(20, generator=g).float().reshape(2, 2, 5)  # distinct: no ties in the ranking
    loss = attention_contrastive_loss(student, teacher, scores, k_anchors=2, temperature=0.2)
    assert float(loss.detach()) == pytest.approx(contrastive_reference(student.detach(), teacher, scores, 2, 0.2), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.abs().sum() > 0  # trainable: the student's distributions are the anchors
    # k is capped at half the patches: k = 9 on 5 patches is k = 2
    assert torch.equal(attention_contrastive_loss(student, teacher, scores, k_anchors=9, temperature=0.2), loss)


def test_model_contrastive_term_is_taken_on_the_masked_students_patches(breast_crops):
    """The step feeds the term the student's patch distributions of the masked global crops, the
    teacher's centred and sharpened ones, and each crop's raw last-block [CLS] attention of the teacher."""
    model = tiny_ibot(lambda_cls=0.0, lambda_mim=0.0, contrastive_weight=1.0, mask_strategy="random",
                      mask_prob=1.0).eval()  # eval: no drop-path, centres untouched
    model.patch_center.normal_()
    model.set_epoch(0.5)
    seeds = torch.arange(6)
    out = model(breast_crops, sample_seeds=seeds)
    assert torch.equal(out.loss.detach(), out.metrics["loss_contrastive"])
    tau_tp = model.teacher_temperatures()[1]
    with torch.no_grad():
        g = torch.cat(breast_crops[:2])
        encoded = model.teacher.encode(g, return_attention=[1])
        _, t_patch = model.teacher_head(encoded.tokens)
        scores = encoded.attentions[1][:, :, 0, 1:].mean(dim=1).reshape(2, 6, 49)  # head mean, [CLS] -> patches
        masks, _ = model.draw_masks(encoded.attentions, 6, seeds, "cpu")  # random masks: scores unused
        _, s_patch = model.student_head(model.student.encode(g, mask=masks).tokens)
    student = F.softmax(s_patch / 0.1, -1).reshape(2, 6, 49, -1)
    teacher = F.softmax((t_patch - model.patch_center) / tau_tp, -1).reshape(2, 6, 49, -1)
    expected = contrastive_reference(student, teacher, scores, 3, 0.2)
    assert float(out.metrics["loss_contrastive"]) == pytest.approx(expected, rel=1e-4)
    out.loss.backward()
    assert model.student.blocks[1].mlp.fc2.weight.grad.abs().sum() > 0


def test_ema_update_and_momentum_schedule():
    model = tiny_ibot(momentum_teacher=0.99, total_epochs=10)
    with torch.no_grad():
        for p in [*model.student.parameters(), *model.student_head.parameters()]:
            p.add_(torch.randn_like(p))
    student = dict(model.student.named_parameters())
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    model.update_teacher(0.9)
    for name, p in model.teacher.named_parameters():
        assert torch.allclose(p, 0.9 * before[name] + 0.1 * student[name], atol=1e-6), name
    assert math.isclose(model.teacher_momentum(0), 0.99) and math.isclose(model.teacher_momentum(10), 1.0)
    assert math.isclose(model.teacher_momentum(5), 1 - 0.01 / 2) and math.isclose(model.teacher_momentum(20), 1.0)


def test_centring_matches_its_formula():
    model = tiny_ibot(center_momentum=0.9)
    model.center.fill_(1.0)
    t_cls, t_patch = torch.randn(8, 256), torch.randn(8, 49, 256)
    model.update_centers(t_cls, t_patch)
    assert torch.allclose(model.center, 0.9 + 0.1 * t_cls.mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(model.patch_center, 0.1 * t_patch.mean(dim=(0, 1))[None], atol=1e-6)


def test_teacher_temperature_warmup_and_frozen_last_layer(breast_crops):
    model = tiny_ibot(warmup_teacher_temp_epochs=2, freeze_last_layer=1)
    assert model.teacher_temperatures(0) == (0.04, 0.04) and model.teacher_temperatures(5) == (0.07, 0.07)
    assert math.isclose(model.teacher_temperatures(1)[0], 0.055)
    model(breast_crops, sample_seeds=torch.arange(6)).loss.backward()
    last = model.student_head.last_layer.parametrizations.weight.original1
    assert last.grad is not None
    model.before_optimizer_step(1.0)  # last step of epoch 0: still frozen
    assert last.grad is None and model.student_head.mlp[0].weight.grad is not None
    model(breast_crops, sample_seeds=torch.arange(6)).loss.backward()
    model.before_optimizer_step(1.2)
    assert last.grad is not None


def test_each_global_crop_gets_its_own_strategy_score_and_layer(breast_crops):
    model = tiny_ibot(mask_strategy=["attmask_high", "block"], mask_scores=["raw", "rollout_all"],
                      mask_layers=[0, -1], mask_prob=1.0, contrastive_weight=0.5)
    assert model.attention_layers_needed() == [0, 1]  # raw at block 0 (crop 1), rollout over both (crop 2)
    g = torch.cat(breast_crops[:2])
    with torch.no_grad():
        attn = model.teacher.encode(g, return_attention=[0, 1]).attentions
    seeds = torch.arange(6)
    masks, scores = model.draw_masks(attn, 6, seeds, "cpu")
    counts = masks[:6].sum(1)
    assert torch.equal(scores[0], attention_scores({0: attn[0][:6]}, "raw", layer=0))
    assert torch.equal(masks[:6], attmask(scores[0], counts, "high"))
    assert torch.equal(scores[1], attention_scores({i: a[6:] for i, a in attn.items()}, "rollout_all"))
    # Per-sample seeds: sample 4's masks are the same when it is drawn alone.
    alone, _ = model.draw_masks({i: a[[4, 10]] for i, a in attn.items()}, 1, seeds[4:5], "cpu")
    assert torch.equal(alone, masks[[4, 10]])
    with pytest.raises(ConfigError, match="mask_strategy"):
        tiny_ibot(mask_strategy="checkerboard")


@pytest.fixture(scope="module")
def ibot_run(tmp_path_factory):
    """One short engine run on 64 real BreastMNIST images (2 steps of 32)."""
    root = tmp_path_factory.mktemp("ibot")
    src = np.load(shared_file("breastmnist.npz"))
    small = root / "breast_small.npz"
    np.savez(small, train_images=src["train_images"][:64], train_labels=src["train_labels"][:64],
             test_images=src["test_images"][:32], test_labels=src["test_labels"][:32])
    cfg = load_config(REPO / "configs/ibot/vit_tiny_p4_28.yaml", [
        *TINY_IBOT_CLI, f"data.path={small}", f"output_dir={root / 'run'}", "train.epochs=1",
        "train.warmup_epochs=0", "train.batch_size=32", "train.progress=false", "train.log_every=1",
        "model.mask_strategy=[attmask_hint,attmask_high]",
    ])
    summary = pretrain(cfg)
    return root, small, summary


def test_pretrain_through_the_engine_and_evaluate_the_teacher(ibot_run):
    root, small, summary = ibot_run
    assert summary["final_epoch"] == 1 and math.isfinite(summary["final_loss"])
    model, ckpt = build_from_checkpoint(root / "run/last.pt")
    assert isinstance(model, IBOT) and ckpt["model_config"]["mask_strategy"] == ["attmask_hint", "attmask_high"]
    assert model.total_epochs == 1  # the momentum schedule follows train.epochs when the config leaves it out
    assert model.center.abs().sum() > 0  # centres are saved (resume)
    # the teacher by default, the student when asked: each loaded encoder holds exactly that network's weights
    for name, expected in ((None, model.teacher), ("teacher", model.teacher), ("student", model.student)):
        encoder, _ = load_encoder(root / "run/last.pt", encoder=name)
        assert encoder.state_dict().keys() == expected.state_dict().keys(), name
        assert all(torch.equal(v, expected.state_dict()[k]) for k, v in encoder.state_dict().items()), name
    # The teacher moved away from the student by EMA (it is not a copy).
    assert not torch.equal(model.teacher.blocks[0].attn.qkv.weight, model.student.blocks[0].attn.qkv.weight)


def test_visualize_attention_and_rollout(ibot_run, capsys):
    root, small, _ = ibot_run
    for what in ("attention", "rollout"):
        out = root / f"{what}.png"
        assert main(["visualize", "--what", what, "--checkpoint", str(root / "run/last.pt"), "--data", str(small),
                     "--out", str(out), "--num-images", "2", "--head-fusion", "max", "--discard-ratio", "0.5"]) == 0
        assert out.stat().st_size > 5000
    assert main(["visualize", "--what", "attention", "--checkpoint", str(root / "run/last.pt"), "--data", str(small),
                 "--out", str(root / "x.png"), "--layer", "7"]) == 2
    assert "--layer 7 does not exist" in capsys.readouterr().err
    assert not (root / "x.png").exists()


def test_ibot_configs_load_and_match_the_seed_recipe():
    for path in sorted(Path(REPO / "configs/ibot").glob("*.yaml")):
        cfg = load_config(path, [])
        assert cfg.train.betas == [0.9, 0.999] and cfg.train.weight_decay_end == 0.4 and cfg.train.clip_grad == 3.0
        assert cfg.model.get("total_epochs") in (None, cfg.train.epochs), path.name  # None: train.epochs
    small = create_model("ibot_multimask_vit_small_patch16")
    assert (small.num_local_crops, small.local_crop_size, small.mask_layers) == (6, 96, [11, 4])
    assert small.attention_layers_needed() == [4, 11] and small.total_epochs == 100
    cfg = load_config(REPO / "configs/ibot/vit_tiny_p4_28.yaml", ["model.mask_scores=entropy"])
    with pytest.raises(ConfigError, match="mask_scores 'entropy' is unknown"):  # raised when the run builds the model
        create_model(**cfg.model)


def test_local_crops_get_a_resampled_position_table():
    vit = tiny_ibot().student
    table = vit.position_table((3, 3))
    assert table.shape == (1, 10, vit.embed_dim) and vit.position_table((7, 7)) is vit.pos_embed
    assert torch.allclose(table, resample_abs_pos_embed(vit.pos_embed, [3, 3], [7, 7], num_prefix_tokens=1))
    assert vit.encode(torch.randn(2, 1, 12, 12)).tokens.shape == (2, 10, vit.embed_dim)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        vit.encode(torch.randn(2, 1, 14, 14))
