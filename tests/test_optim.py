"""Optimizer paths of the engine: fp16 gradient scaling, torch.compile, the weight-decay schedule, LARS.

The runs pretrain the tiny MAE of tests.conftest on the first images of the shared BreastMNIST
(written to a small .npz in tmp_path), on CPU.
"""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import mimkit.engine.trainer as trainer
from mimkit.checkpoint import load_file
from mimkit.config import TrainConfig, load_config
from mimkit.engine.optim import build_optimizer
from mimkit.engine.trainer import _weight_decay_at, pretrain
from mimkit.methods.mae import MAE
from tests.conftest import TINY_MAE, shared_file


def _few_images(tmp_path, n):
    """The first n BreastMNIST training images as their own .npz (stats and runs stay tiny)."""
    with np.load(shared_file("breastmnist.npz")) as z:
        images, labels = z["train_images"][:n], z["train_labels"][:n]
    path = tmp_path / f"breast{n}.npz"
    np.savez(path, train_images=images, train_labels=labels)
    return path


def _config(data, out, *extra):
    return load_config(None, [*TINY_MAE, f"data.path={data}", f"output_dir={out}", "train.warmup_epochs=0",
                              "train.batch_size=8", "train.progress=false", "train.log_every=1",
                              "train.device=cpu", "train.resume=false", *extra])


def _train_losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if r["kind"] == "train"]


# --------------------------------------------------------------------------- fp16 + GradScaler

def test_fp16_scaler_skips_an_inf_step_halves_then_regrows_the_scale(tmp_path, monkeypatch):
    """fp16 autocast on CPU with the trainer's GradScaler (growth interval shortened to 3 so growth
    shows in 8 steps). An inf put into one gradient during the backward of step 2 must skip that
    step (no weight and no AdamW step count changes; the fused CPU AdamW gets found_inf from the
    scaler) and halve the scale; three good steps later the scale doubles back, as
    torch.amp.GradScaler documents."""
    data = _few_images(tmp_path, 32)  # 4 steps per epoch at batch 8
    scalers, autocast_seen, events = [], set(), []
    inf_step = 2

    class ShortGrowth(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, growth_interval=3, **kwargs)
            scalers.append(self)

    original_forward = MAE.forward

    def forward(self, *args, **kwargs):  # one forward per optimizer step (accum_iter 1)
        autocast_seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        if len(events) == inf_step:
            def poison(grad):
                handle.remove()
                grad = grad.clone()
                grad.view(-1)[0] = float("inf")
                return grad
            handle = self.patch_embed.proj.weight.register_hook(poison)
        events.append({"before": {n: p.detach().clone() for n, p in self.named_parameters()}})
        return original_forward(self, *args, **kwargs)

    def after(self, progress):
        events[-1]["after"] = {n: p.detach().clone() for n, p in self.named_parameters()}
        events[-1]["scale"] = scalers[0].get_scale()

    monkeypatch.setattr(torch.amp, "GradScaler", ShortGrowth)
    monkeypatch.setattr(MAE, "forward", forward)
    monkeypatch.setattr(MAE, "after_optimizer_step", after, raising=False)

    out = tmp_path / "fp16"
    pretrain(_config(data, out, "train.epochs=2", "train.precision=fp16", "train.lr=1e-3"))

    assert autocast_seen == {(True, torch.float16)}
    assert len(scalers) == 1 and scalers[0].is_enabled() and len(events) == 8
    # 2^16 -> two good steps -> inf: halved -> three good steps: doubled -> two good steps.
    assert [e["scale"] for e in events] == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0, 65536.0, 65536.0, 65536.0]
    for k, e in enumerate(events):
        changed = [n for n in e["before"] if not torch.equal(e["before"][n], e["after"][n])]
        if k == inf_step:
            assert changed == [], f"the skipped step changed {changed}"
        else:
            assert "patch_embed.proj.weight" in changed and "blocks.0.attn.qkv.weight" in changed, k
    ckpt = load_file(out / "last.pt")
    assert ckpt["scaler"] == {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3,
                              "_growth_tracker": 2}
    assert {float(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {7.0}  # 8 steps, 1 skipped
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# --------------------------------------------------------------------------- torch.compile

def test_compiled_run_gives_the_eager_losses_and_weights(tmp_path, monkeypatch, capsys):
    """train.compile=true (inductor on CPU): the same per-step losses and final weights as eager.
    Cold compile takes 45-60 s on 2 busy cores (3-7 s once inductor's on-disk cache is warm)."""
    data = _few_images(tmp_path, 32)
    # One block: half the compile time. SGD, not AdamW: Adam's first steps are about lr * sign(g),
    # so float noise on a near-zero gradient entry would flip a whole lr step and hide in the weights.
    common = ["train.epochs=1", "train.optimizer=sgd", "train.lr=0.05", "model.depth=1"]
    pretrain(_config(data, tmp_path / "eager", *common))

    compiled = []
    real_compile = torch.compile

    def spy(model, *args, **kwargs):
        compiled.append(model)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        pretrain(_config(data, tmp_path / "compiled", *common, "train.compile=true"))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert len(compiled) == 1 and isinstance(compiled[0], MAE) and graphs >= 1
    assert ", compiled," in capsys.readouterr().out

    eager, comp = _train_losses(tmp_path / "eager"), _train_losses(tmp_path / "compiled")
    assert len(eager) == len(comp) == 4 and eager[0] != eager[-1]
    torch.testing.assert_close(torch.tensor(comp), torch.tensor(eager), rtol=1e-5, atol=0)
    a, b = load_file(tmp_path / "eager" / "last.pt")["model"], load_file(tmp_path / "compiled" / "last.pt")["model"]
    assert a.keys() == b.keys()  # no "_orig_mod." prefixes from the compiled wrapper
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- weight decay schedule

def _cosine_wd(start, end, epoch, epochs):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, epoch / epochs)))


def test_weight_decay_cosine_matches_the_hand_formula():
    cfg = TrainConfig(epochs=10, weight_decay=0.04, weight_decay_end=0.4)
    # wd(e) = 0.4 - 0.36 * (1 + cos(pi e / 10)) / 2, written out: cos(pi/4) = 0.70710678...
    hand = {0.0: 0.04, 2.5: 0.4 - 0.18 * (1 + 0.7071067811865476), 5.0: 0.22,
            7.5: 0.4 - 0.18 * (1 - 0.7071067811865476), 10.0: 0.4, 12.0: 0.4}
    for epoch, value in hand.items():
        assert _weight_decay_at(cfg, epoch) == pytest.approx(value, rel=1e-12, abs=1e-15), epoch
    down = TrainConfig(epochs=4, weight_decay=0.3, weight_decay_end=0.0)
    assert _weight_decay_at(down, 1.0) == pytest.approx(0.15 * (1 + 0.7071067811865476), rel=1e-12)
    assert _weight_decay_at(TrainConfig(epochs=10, weight_decay=0.05), 7.3) == 0.05  # no end: constant


def test_weight_decay_schedule_reaches_the_optimizer_groups_during_a_run(tmp_path, monkeypatch):
    """Every optimizer step sees wd(epoch + it / iters) in the decayed groups; the no-decay groups
    (biases, norms, tokens) keep 0. The scaler of an fp32 run is disabled (empty state)."""
    data = _few_images(tmp_path, 32)
    seen = []
    real_build = trainer.build_optimizer

    def build(model, t_cfg, lr):
        opt = real_build(model, t_cfg, lr)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append([g["weight_decay"] for g in o.param_groups]))
        return opt

    monkeypatch.setattr(trainer, "build_optimizer", build)
    out = tmp_path / "wd"
    pretrain(_config(data, out, "train.epochs=2", "train.weight_decay=0.05", "train.weight_decay_end=0.5"))

    assert len(seen) == 8  # 2 epochs x 4 steps
    for step, groups in enumerate(seen):
        expected = _cosine_wd(0.05, 0.5, step / 4, 2)
        assert groups == [pytest.approx(expected, rel=1e-12), 0.0], (step, groups)
    assert seen[0][0] == pytest.approx(0.05) and seen[-1][0] == pytest.approx(_cosine_wd(0.05, 0.5, 1.75, 2))
    ckpt = load_file(out / "last.pt")
    assert ckpt["scaler"] == {}
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [pytest.approx(seen[-1][0]), 0.0]


# --------------------------------------------------------------------------- LARS

TRUST = 0.001  # trust coefficient of build_optimizer


def _norm(t):
    return t.double().pow(2).sum().sqrt()


def _timm_scaled(w, g, wd):
    """What mimkit uses (timm Lars, always_adapt): (g + wd w) * tc ||w|| / (||g|| + wd ||w|| + 1e-8),
    ratio 1 when ||w|| or ||g|| is 0."""
    w_norm, g_norm = _norm(w), _norm(g)
    ratio = TRUST * w_norm / (g_norm + wd * w_norm + 1e-8) if w_norm > 0 and g_norm > 0 else 1.0
    return (g + wd * w) * ratio


def _mae_scaled(w, g, wd):
    """Official MAE util/lars.py: u = g + wd w, scaled by tc ||w|| / ||u||, ratio 1 when either norm is 0."""
    u = g + wd * w
    w_norm, u_norm = _norm(w), _norm(u)
    return u * (TRUST * w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)


def _lars_by_hand(w, b, grads, wd, lr, momentum, scaled):
    """Two LARS steps: 2-D weight trust-scaled by ``scaled``, 1-D bias plain momentum SGD (no decay)."""
    buf_w = buf_b = None
    for gw, gb in grads:
        u = scaled(w, gw, wd)
        buf_w = u if buf_w is None else momentum * buf_w + u
        buf_b = gb if buf_b is None else momentum * buf_b + gb
        w, b = w - lr * buf_w, b - lr * buf_b
    return w, b


def _lars_run(wd, grads, lr=0.5, momentum=0.9):
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = build_optimizer(model, TrainConfig(optimizer="lars", weight_decay=wd, momentum=momentum), lr)
    for gw, gb in grads:
        model.weight.grad, model.bias.grad = gw.clone(), gb.clone()
        opt.step()
    return w0, b0, model.weight.detach(), model.bias.detach()


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_lars_steps_equal_the_timm_trust_ratio_by_hand(wd):
    g = torch.Generator().manual_seed(1)
    # Gradient norms comparable to wd * ||w||, where the two trust ratios part the most.
    grads = [(0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64))
             for _ in range(2)]
    w0, b0, w2, b2 = _lars_run(wd, grads)
    hand_w, hand_b = _lars_by_hand(w0, b0, grads, wd, 0.5, 0.9, _timm_scaled)
    torch.testing.assert_close(w2, hand_w, rtol=0, atol=1e-13)
    torch.testing.assert_close(b2, hand_b, rtol=0, atol=1e-13)  # momentum SGD: no trust ratio, no decay
    assert not torch.allclose(w2, _lars_by_hand(w0, b0, grads, wd, 0.5, 0.9, lambda w, g_, d: g_ + d * w)[0])

    # The official MAE ratio divides by ||g + wd w|| instead of ||g|| + wd ||w||: same at wd 0,
    # a different step for wd > 0, which this test tells apart.
    mae_w, _ = _lars_by_hand(w0, b0, grads, wd, 0.5, 0.9, _mae_scaled)
    step_timm, step_mae = _norm(w0 - hand_w), _norm(w0 - mae_w)
    if wd == 0:
        torch.testing.assert_close(mae_w, hand_w, rtol=1e-7, atol=0)  # up to timm's eps 1e-8 in the ratio
    else:
        assert step_mae / step_timm > 1.1, (step_mae, step_timm)
        assert not torch.allclose(w2, mae_w, rtol=0, atol=1e-6)


def test_lars_zero_gradient_with_weight_decay_takes_the_unscaled_decay():
    """timm's ratio is 1 when ||g|| = 0, so a weight matrix with an all-zero gradient moves by
    lr * wd * w; MAE's ratio there is tc / wd (step lr * tc * w), 300x smaller at wd 0.3."""
    wd, lr = 0.3, 0.5
    zero = [(torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))]
    w0, b0, w1, b1 = _lars_run(wd, zero, lr=lr)
    torch.testing.assert_close(w1, w0 - lr * wd * w0, rtol=0, atol=1e-15)
    assert torch.equal(b1, b0)
    mae_w, _ = _lars_by_hand(w0, b0, zero, wd, lr, 0.9, _mae_scaled)
    torch.testing.assert_close(mae_w, w0 - lr * TRUST * w0, rtol=0, atol=1e-15)


def test_lars_groups_adapt_only_matrices_and_keep_lr_scale():
    """Group layout build_optimizer hands to timm: >1-D params adapted with the decay, 1-D params
    not adapted with decay 0, extra keys (lr_scale of layer-decay groups) kept on both."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def optimizer_param_groups(self, weight_decay):
            return [{"params": list(self.parameters()), "weight_decay": weight_decay, "lr_scale": 0.25}]

    model = Scaled()
    opt = build_optimizer(model, TrainConfig(optimizer="lars", weight_decay=0.1, momentum=0.9), 1.0)
    layout = [([tuple(p.shape) for p in g["params"]], g["weight_decay"], g["always_adapt"], g["lr_scale"])
              for g in opt.param_groups]
    assert layout == [([(2, 3)], 0.1, True, 0.25), ([(2,)], 0.0, False, 0.25)]
    assert opt.defaults["trust_coeff"] == TRUST and not opt.defaults["trust_clip"]
