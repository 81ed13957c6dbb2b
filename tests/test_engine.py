"""The training loop: schedule, parameter groups, checkpoints, exact resume after SIGKILL, DDP = 1 process."""

import copy
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mimkit
from mimkit.checkpoint import load_file
from mimkit.config import TrainConfig, load_config
from mimkit.engine import trainer
from mimkit.engine.guard import FiniteGuard, gated_step
from mimkit.engine.optim import build_optimizer, param_groups
from mimkit.engine.sampling import SeededSampler, SeededTransformDataset, check_run_seed, generator_seed
from mimkit.engine.sampling import sample_seed
from mimkit.engine.schedule import scaled_lr, warmup_cosine
from mimkit.engine.trainer import pretrain
from mimkit.errors import ConfigError, TrainingError
from mimkit.masking import hash32
from mimkit.methods.mae import MAE
from tests.conftest import REPO, TINY_MAE, shared_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "mimkit", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _losses(path):
    return [r["loss"] for r in map(json.loads, open(path)) if r["kind"] == "train"]


def test_schedule_and_scaling_rule():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert warmup_cosine(0.0, 1.0, 0.0, 4, 40) == 0.0
    assert warmup_cosine(2.0, 1.0, 0.0, 4, 40) == pytest.approx(0.5)
    assert warmup_cosine(4.0, 1.0, 0.0, 4, 40) == pytest.approx(1.0)
    assert warmup_cosine(22.0, 1.0, 0.1, 4, 40) == pytest.approx(0.55)
    assert warmup_cosine(40.0, 1.0, 0.1, 4, 40) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_tokens():
    model = mimkit.create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= decay_names
    assert "pos_embed" not in decay_names | no_decay_names  # frozen sin-cos table
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_short_run_writes_safe_checkpoint_and_logs(tmp_path, breast):
    out = tmp_path / "run"
    cfg = load_config(None, [*TINY_MAE, f"data.path={breast}", f"output_dir={out}", "train.epochs=2",
                             "train.warmup_epochs=1", "train.batch_size=64", "train.progress=false",
                             "train.save_every=1", "train.accum_iter=2", "train.log_every=2"])
    summary = pretrain(cfg)
    assert summary["final_epoch"] == 2 and summary["final_loss"] > 0
    ckpt = load_file(out / "last.pt")  # weights_only=True
    assert ckpt["format"] == "mimkit" and ckpt["epoch"] == 1 and ckpt["model_config"]["in_chans"] == 1
    assert len(ckpt["data_stats"]["mean"]) == 1
    assert (out / "checkpoint-0001.pt").is_file() and (out / "checkpoint-0002.pt").is_file()
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert {r["kind"] for r in records} == {"train", "epoch"}
    assert records[-1]["step"] == 2 * (546 // 64 // 2)  # optimizer steps with accumulation 2
    assert not list(out.glob("*.tmp"))


def test_resume_after_sigkill_gives_identical_weights(tmp_path):
    data = shared_file("pneumoniamnist.npz")
    common = ["pretrain", *TINY_MAE, f"data.path={data}", "train.epochs=2", "train.warmup_epochs=1",
              "train.batch_size=32", "train.log_every=1", "train.progress=false", "train.save_every=1"]
    straight = _cli([*common, f"output_dir={tmp_path / 'a'}"])
    assert straight.wait(timeout=600) == 0, straight.stdout.read()

    log = tmp_path / "b" / "log.jsonl"
    victim = _cli([*common, f"output_dir={tmp_path / 'b'}"])
    deadline = time.time() + 600
    while time.time() < deadline:  # kill a few steps into the second epoch
        if log.is_file() and any(r["kind"] == "train" and r["epoch"] == 1 and r["step"] >= 150
                                 for r in map(json.loads, log.read_text().splitlines())):
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert load_file(tmp_path / "b" / "last.pt")["epoch"] == 0, "the kill must land inside the second epoch"

    resumed = _cli([*common, f"output_dir={tmp_path / 'b'}"])
    text = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0 and "Resuming from" in text
    a = load_file(tmp_path / "a" / "last.pt")["model"]
    b = load_file(tmp_path / "b" / "last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_follow_single_process_curve(tmp_path, breast):
    common = [*TINY_MAE, f"data.path={breast}", "train.epochs=1", "train.warmup_epochs=0.5",
              "train.log_every=1", "train.progress=false", "train.precision=fp32"]
    single = _cli(["pretrain", *common, "train.batch_size=32", f"output_dir={tmp_path / 'one'}"])
    assert single.wait(timeout=600) == 0, single.stdout.read()
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mimkit",
         "pretrain", *common, "train.batch_size=16", f"output_dir={tmp_path / 'two'}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "2 process(es)" in ddp.stdout and "effective batch 32" in ddp.stdout
    one, two = _losses(tmp_path / "one" / "log.jsonl"), _losses(tmp_path / "two" / "log.jsonl")
    assert len(one) == len(two) == 546 // 32
    assert torch.allclose(torch.tensor(one), torch.tensor(two), rtol=1e-4), (one, two)
    assert one[0] != one[-1]  # it trained


def test_nan_loss_at_step_k_is_never_applied_and_names_the_step(tmp_path, breast, monkeypatch):
    """A NaN loss at optimizer step k (epoch 2): neither it nor any later step changes the weights or
    the optimizer state, the error names step k, and last.pt stays the epoch-1 checkpoint."""
    out, k = tmp_path / "nan", 8 + 3  # 546 // 64 = 8 steps per epoch: the third step of epoch 2
    cfg = load_config(None, [*TINY_MAE, f"data.path={breast}", f"output_dir={out}", "train.warmup_epochs=0",
                             "train.batch_size=64", "train.progress=false", "train.log_every=5", "train.epochs=2"])
    calls, weights, opt_states, optimizers = itertools.count(1), [], [], []
    original = MAE.forward

    def poisoned(self, images, sample_seeds=None):
        result = original(self, images, sample_seeds)
        if next(calls) == k:
            result.loss = result.loss * float("nan")
            result.metrics["loss"] = result.loss.detach()
        return result

    def record(self, progress):  # after every optimizer step, gated or not
        weights.append(copy.deepcopy(self.state_dict()))
        opt_states.append(copy.deepcopy(optimizers[0].state_dict()["state"]))

    monkeypatch.setattr(trainer, "build_optimizer", lambda *a: optimizers.append(build_optimizer(*a)) or optimizers[0])
    monkeypatch.setattr(MAE, "forward", poisoned)
    monkeypatch.setattr(MAE, "after_optimizer_step", record, raising=False)
    with pytest.raises(TrainingError, match=rf"step {k} \(epoch 2\).*last good checkpoint, .*last.pt \(epoch 1\)"):
        pretrain(cfg)
    assert len(weights) == 8 + 5  # stopped at the first log line after step k (log_every=5)
    good, good_opt = weights[k - 2], opt_states[k - 2]  # after step k - 1
    assert not _same(good, weights[k - 3])  # step k - 1 did train
    for later, later_opt in zip(weights[k - 1:], opt_states[k - 1:]):
        assert _same(later, good)
        assert all(_same(later_opt[i], good_opt[i]) for i in good_opt)
    kept = load_file(out / "last.pt")
    assert kept["epoch"] == 0 and kept["step"] == 8 and _same(kept["model"], weights[7])
    assert all(math.isfinite(r["loss"]) for r in map(json.loads, open(out / "log.jsonl")))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_guard_gates_every_step_from_the_first_bad_one_and_says_why():
    images, nan = torch.ones(2, 1, 4, 4), torch.tensor(float("nan"))
    g = FiniteGuard(torch.device("cpu"))
    g.observe(torch.tensor(1.0), images)
    assert bool(g.allow(torch.tensor(3.0), 1))
    g.observe(nan, images)
    assert not bool(g.allow(torch.tensor(3.0), 2))
    g.observe(torch.tensor(1.0), images)
    assert not bool(g.allow(torch.tensor(3.0), 3))  # sticky: nothing after a failure is applied
    assert g.failed().tolist() == [1.0] and int(g.first_bad) == 2
    text = str(g.error(1, None, fp16=False))
    assert "step 2 (epoch 2)" in text and "no checkpoint was written" in text and "learning rate" in text
    assert "pixels" not in text and "fp16" not in text

    # fp16: an infinite gradient only skips its step (GradScaler backs off); a NaN loss with NaN pixels is named.
    h = FiniteGuard(torch.device("cpu"), grads_may_overflow=True)
    h.observe(torch.tensor(1.0), images)
    assert not bool(h.allow(torch.tensor(float("inf")), 1)) and h.failed().tolist() == [0.0]
    h.observe(torch.tensor(1.0), [images, images])
    assert bool(h.allow(torch.tensor(1.0), 2))
    bad = images.clone()
    bad[1, 0, 2, 3] = float("nan")
    h.observe(nan, [images, bad])
    assert not bool(h.allow(nan, 3))
    text = str(h.error(0, (Path("run/last.pt"), 0), fp16=True))
    assert "step 3 (epoch 1)" in text and "NaN or infinite pixels" in text and "run/last.pt (epoch 1)" in text


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_gated_step_leaves_no_trace_of_a_bad_step(name):
    """Gated steps bad, good, bad, good, good end bit-identical to a twin that only took the good ones
    (the first bad step comes before any optimizer state exists)."""
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
        return model, build_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.05), 0.1)

    (gated, gated_opt), (twin, twin_opt) = make(), make()
    good = [[torch.randn_like(p) for p in twin.parameters()] for _ in range(3)]
    bad = [torch.full_like(g, float("nan")) for g in good[0]]

    def set_grads(model, grads):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()

    for grads, ok in [(bad, False), (good[0], True), (bad, False), (good[1], True), (good[2], True)]:
        set_grads(gated, grads)
        gated_step(gated_opt, torch.tensor(ok))
    for grads in good:
        set_grads(twin, grads)
        twin_opt.step()
    assert _same(gated.state_dict(), twin.state_dict())
    gated_state, twin_state = gated_opt.state_dict()["state"], twin_opt.state_dict()["state"]
    assert gated_state.keys() == twin_state.keys() and all(_same(gated_state[i], twin_state[i]) for i in twin_state)


def test_every_bit_of_the_run_seed_counts_and_small_seeds_keep_their_values():
    for seed, epoch, index in [(5, 3, 17), (0, 0, 0), (32767, 65535, 2**32 - 1)]:
        assert sample_seed(seed, epoch, index) == (seed << 48) | (epoch << 32) | index  # the published formula
    assert sample_seed(0, 1, 2) != sample_seed(32768, 1, 2)
    assert sample_seed(2**63 - 1, 1, 2) != sample_seed(2**63 - 1 - 2**40, 1, 2)
    assert 0 <= sample_seed(2**63 - 1, 65535, 2**32 - 1) < 2**63  # fits the int64 seed tensors

    def order(seed, epoch):
        sampler = SeededSampler(50, seed)
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        assert [s for _, s in pairs] == [sample_seed(seed, epoch, i) for i, _ in pairs]
        return [i for i, _ in pairs]

    assert order(5, 2) == torch.randperm(50, generator=torch.Generator().manual_seed(5 * 100_003 + 2)).tolist()
    assert order(0, 1) != order(32768, 1)
    assert order(0, 1) != order(2**32, 1)  # equal low 32 bits: the generator alone would see the same seed
    assert sorted(order(2**63 - 1, 9)) == list(range(50))
    for bad in (-1, 2**63, 1.5):
        with pytest.raises(ConfigError, match="train.seed must be an integer from 0 to 2\\*\\*63 - 1"):
            check_run_seed(bad)


def test_a_sample_transform_repeats_from_its_seed_whichever_generator_it_draws_from():
    """torchvision draws from torch, timm's RandAugment from numpy, RandomErasing from Python's random."""
    def draws(_image):
        return torch.rand(1).item(), float(np.random.rand()), random.random()

    items = SeededTransformDataset([(None, 0)], draws)
    np.random.seed(1), random.seed(1), torch.manual_seed(1)
    first = items[(0, 7)][0]
    np.random.seed(2), random.seed(2), torch.manual_seed(2)  # another process's global state
    assert items[(0, 7)][0] == first and items[(0, 8)][0] != first
    after = torch.rand(1).item()
    torch.manual_seed(2)
    assert after == torch.rand(1).item()  # torch's state restored: the loop's dropout stream is untouched


def test_generator_seed_equals_its_tensor_definition():
    seeds = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, *(random.Random(0).randrange(2**63) for _ in range(200))]
    t = torch.tensor(seeds, dtype=torch.int64)
    assert [generator_seed(s) for s in seeds] == hash32(hash32(t & 0xFFFFFFFF) ^ (t >> 32)).tolist()
