"""The training loop: schedule, parameter groups, checkpoints, exact resume after SIGKILL, DDP = 1 process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mimkit
from mimkit.checkpoint import load_file
from mimkit.config import load_config
from mimkit.engine.optim import param_groups
from mimkit.engine.schedule import scaled_lr, warmup_cosine
from mimkit.engine.trainer import pretrain
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


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path, breast, monkeypatch):
    from mimkit.errors import TrainingError
    from mimkit.methods.mae import MAE

    out = tmp_path / "nan"
    base = [*TINY_MAE, f"data.path={breast}", f"output_dir={out}", "train.warmup_epochs=0",
            "train.batch_size=64", "train.progress=false", "train.log_every=1"]
    pretrain(load_config(None, [*base, "train.epochs=1"]))
    good = load_file(out / "last.pt")["model"]

    original = MAE.forward

    def poisoned(self, images, sample_seeds=None):
        out_ = original(self, images, sample_seeds)
        out_.loss = out_.loss * float("nan")
        out_.metrics["loss"] = out_.loss.detach()
        return out_

    monkeypatch.setattr(MAE, "forward", poisoned)
    with pytest.raises(TrainingError, match="last good checkpoint"):
        pretrain(load_config(None, [*base, "train.epochs=2"]))
    kept = load_file(out / "last.pt")
    assert kept["epoch"] == 0 and all(torch.equal(kept["model"][k], good[k]) for k in good)
