"""Resume and the engine's failure paths, on a method small enough that a whole run takes a fraction
of a second: corrupt or planted checkpoints, stray temporaries, changed settings, a finished run,
a full disk, replayed log records, warmup longer than the run, fp16 on a CPU."""

import errno
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from mimkit import checkpoint
from mimkit.checkpoint import load_file, save_atomic
from mimkit.config import load_config
from mimkit.data import ImageDataset
from mimkit.engine import trainer
from mimkit.engine.distributed import DistInfo
from mimkit.engine.schedule import scaled_lr
from mimkit.engine.trainer import TrainingSetup, run_training, train_loop
from mimkit.errors import CheckpointError, ConfigError, MimkitError
from mimkit.methods.base import StepOutput

DATA = ImageDataset(np.random.RandomState(0).randint(0, 256, (40, 4, 4), dtype=np.uint8))  # 5 steps of 8


class TinyMethod(nn.Module):
    """Predicts 3 x each image's mean; dropout draws from the global RNG, so resume must restore it."""

    def __init__(self, gain: float = 1.0, seed: int | None = 0):
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.net, self.drop, self.gain = nn.Linear(16, 1), nn.Dropout(0.2), gain

    def forward(self, images, sample_seeds=None):
        pred = self.net(self.drop(images.flatten(1))).squeeze(1)
        loss = self.gain * ((pred.float() - 3 * images.mean(dim=(1, 2, 3))) ** 2).mean()
        return StepOutput(loss, {"loss": loss.detach()})


class Interrupted(Exception):
    """Stands in for a kill at the end of an epoch, after its train records, before its checkpoints."""


def _jitter(image):
    return image + 0.05 * torch.randn_like(image)  # drawn under the sample's seed


def _setup(stop_at: int | None = None, gain: float = 1.0) -> TrainingSetup:
    def evaluate(model, epoch):
        if epoch == stop_at:
            raise Interrupted
        return None

    return TrainingSetup(TinyMethod(gain), DATA, _jitter, {"name": "tiny"}, {"mean": [0.5], "std": [0.25]},
                         "pretrain", "tiny", evaluate)


def _cfg(out, *overrides):
    return load_config(None, [f"output_dir={out}", "train.epochs=4", "train.warmup_epochs=1", "train.batch_size=8",
                              "train.blr=20", "train.weight_decay_end=0.5", "train.progress=false", "train.save_every=1", "train.log_every=2",
                              *overrides])


def _run(cfg, setup=None):
    return train_loop(cfg, DistInfo(), torch.device("cpu"), setup or _setup())


def _interrupted(out, stop_at: int, *overrides):
    with pytest.raises(Interrupted):
        _run(_cfg(out, *overrides), _setup(stop_at))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _records(out):
    return [(r["kind"], r["epoch"], r["step"], r["loss"]) for r in map(json.loads, open(out / "log.jsonl"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-epoch run: its folder."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(_cfg(out))
    return out


def test_interrupted_run_resumes_to_the_same_weights_without_duplicate_records(tmp_path, reference):
    out = tmp_path / "run"
    _interrupted(out, 2)  # epoch 3's train records are logged, its checkpoint is not written
    assert load_file(out / "last.pt")["epoch"] == 1 and any(r[1] == 2 for r in _records(out))
    _run(_cfg(out))
    a, b = load_file(reference / "last.pt"), load_file(out / "last.pt")
    assert _same(a["model"], b["model"]) and a["step"] == b["step"] == 20
    assert all(_same(a["optimizer"]["state"][i], b["optimizer"]["state"][i]) for i in a["optimizer"]["state"])
    assert _records(out) == _records(reference)  # the replayed steps' records are not doubled
    assert _tensorboard_steps(out) == _tensorboard_steps(reference)


def _tensorboard_steps(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def test_corrupt_last_pt_resumes_from_the_newest_valid_checkpoint(tmp_path, reference, capsys):
    out = tmp_path / "run"
    _interrupted(out, 3)
    last = out / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    (out / "checkpoint-0003.pt").write_text("not a checkpoint")
    _run(_cfg(out))
    said = capsys.readouterr().out
    assert "last.pt cannot be used" in said and "resuming from checkpoint-0002.pt (epoch 2)" in said
    assert _same(load_file(last)["model"], load_file(reference / "last.pt")["model"])
    assert load_file(out / "checkpoint-0003.pt")["epoch"] == 2  # rewritten by the replayed epoch
    assert _records(out) == _records(reference)


def test_no_valid_checkpoint_is_one_error_and_config_yaml_is_kept(tmp_path):
    out = tmp_path / "run"
    _interrupted(out, 2)
    config_yaml = (out / "config.yaml").read_text()
    for name in ("last.pt", "checkpoint-0001.pt", "checkpoint-0002.pt"):
        (out / name).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"last.pt cannot be used \(.*\) and none of checkpoint-0002.pt, "
                                              r"checkpoint-0001.pt is valid; set train.resume=false"):
        _run(_cfg(out, "train.blr=3"))
    assert (out / "config.yaml").read_text() == config_yaml


def test_planted_pickle_last_pt_is_refused_without_recommending_allow_pickle(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "optimizer": {}, "args": DistInfo()}, out / "last.pt")  # a pickled object
    with pytest.raises(CheckpointError) as err:
        _run(_cfg(out))
    assert "move the file away or choose another output_dir" in str(err.value)
    assert "allow-pickle" not in str(err.value)


def test_stray_temporaries_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stray = [out / ".last.pt.k3j2h1g0.tmp", out / ".checkpoint-0002.pt.a1b2c3d4.tmp", out / ".summary.json.zz.tmp"]
    for p in stray:
        p.write_bytes(b"half a checkpoint")
    (out / "notes.tmp").write_text("the user's")
    _run(_cfg(out, "train.epochs=1"))
    assert not any(p.exists() for p in stray) and (out / "notes.tmp").exists()


def test_changed_settings_are_refused_by_name_unless_allowed(tmp_path, reference, capsys):
    out = tmp_path / "run"
    _interrupted(out, 2)
    config_yaml = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        _run(_cfg(out, "train.blr=3", "train.batch_size=4", "data.hflip=false", "train.log_every=1"))
    text = str(err.value)
    assert "train.blr 20.0 -> 3.0" in text and "train.batch_size 8 -> 4" in text and "data.hflip True -> False" in text
    assert "log_every" not in text and "train.resume_changed=true" in text
    assert (out / "config.yaml").read_text() == config_yaml

    # Settings that cannot change the result may differ freely: the run ends as the reference.
    _run(_cfg(out, "train.log_every=3", "train.save_every=2", "train.device=cpu", "data.num_workers=0"))
    assert _same(load_file(out / "last.pt")["model"], load_file(reference / "last.pt")["model"])

    # The explicit override continues with the new values (two more epochs at a lower lr).
    cfg = _cfg(out, "train.epochs=6", "train.blr=3")
    cfg.train.resume_changed = True  # config key proposed to mimkit/config.py
    _run(cfg)
    assert "train.blr 20.0 -> 3.0" in capsys.readouterr().out
    assert load_file(out / "last.pt")["epoch"] == 5 and load_file(out / "last.pt")["config"]["train"]["blr"] == 3.0


def test_rerunning_a_finished_run_returns_its_summary_and_rewrites_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    first = _run(_cfg(out))
    written = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = _run(_cfg(out, "train.log_every=1"))
    assert again == json.loads(written["summary.json"]) and again["final_loss"] == first["final_loss"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == written
    assert "holds a finished run (4 epochs" in capsys.readouterr().out
    (out / "summary.json").unlink()  # as if killed between last.pt and summary.json
    rebuilt = _run(_cfg(out))
    assert rebuilt["final_epoch"] == 4 and rebuilt["final_loss"] == first["final_loss"]
    assert json.loads((out / "summary.json").read_text()) == rebuilt


def test_a_checkpoint_killed_mid_write_is_rewritten_on_resume(tmp_path, reference, monkeypatch):
    out, real_save = tmp_path / "run", trainer.save_atomic

    def killed_in_checkpoint_0002(payload, path):
        if path.name == "checkpoint-0002.pt":
            raise Interrupted
        return real_save(payload, path)

    monkeypatch.setattr(trainer, "save_atomic", killed_in_checkpoint_0002)
    with pytest.raises(Interrupted):
        _run(_cfg(out))
    assert load_file(out / "last.pt")["epoch"] == 0  # last.pt commits an epoch only after its checkpoint
    monkeypatch.setattr(trainer, "save_atomic", real_save)
    _run(_cfg(out))
    assert _same(load_file(out / "checkpoint-0002.pt")["model"], load_file(reference / "checkpoint-0002.pt")["model"])


def test_full_disk_during_a_checkpoint_write_is_one_error_and_keeps_the_previous(tmp_path, monkeypatch):
    out, real_save, calls = tmp_path / "run", torch.save, []

    def disk_fills_up(obj, f):
        calls.append(1)
        if len(calls) > 2:  # epoch 1's checkpoint-0001.pt and last.pt fit
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    with pytest.raises(MimkitError, match=r"^No disk space left in .* to write checkpoint-0002.pt .*: free disk "
                                          r"space or choose another output_dir\.$"):
        _run(_cfg(out))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_file(out / "last.pt")["epoch"] == 0 and not (out / "checkpoint-0002.pt").exists()
    assert not list(out.glob(".*tmp"))


def test_atomic_write_failures_leave_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"a": torch.ones(2)}, path)
    real_fsync = checkpoint.os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(CheckpointError, match="No disk space left"):
        save_atomic({"a": torch.zeros(2)}, path)
    monkeypatch.setattr(checkpoint.os, "fsync", real_fsync)
    # torch.save reports a real full disk as a RuntimeError: it is called a full disk only when one is.
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("file write failed")))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1024))
    with pytest.raises(CheckpointError, match="No disk space left"):
        save_atomic({"a": torch.zeros(2)}, path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="file write failed"):
        save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(load_file(path)["a"], torch.ones(2)) and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_warmup_longer_than_the_run_is_clamped_with_a_note(tmp_path, capsys):
    cfg = _cfg(tmp_path / "run", "train.log_every=5")
    # What `train.epochs=1` on a recipe with warmup_epochs: 4 gives, once config validation allows it.
    cfg.train.epochs, cfg.train.warmup_epochs = 1, 4.0
    _run(cfg)
    assert "train.warmup_epochs=4 is longer than the run, so warmup is clamped to train.epochs=1" in capsys.readouterr().out
    base = scaled_lr(20, 8)
    last_lr = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "log.jsonl")][-1]
    assert last_lr == pytest.approx(base * 4 / 5)  # lr at step 5 of 5 in a 1-epoch warmup (unclamped: base / 5)


def test_fp16_on_a_cpu_warns_and_skips_overflowing_steps_without_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    _run(_cfg(out, "train.precision=fp16", "train.epochs=2", "train.warmup_epochs=0"), _setup(gain=10))
    assert "warning: fp16 autocast on a CPU is about 10x slower than fp32 or bf16: set train.precision=bf16." in (
        capsys.readouterr().out)
    ckpt = load_file(out / "last.pt")
    assert ckpt["scaler"]["scale"] < 2.0**16  # the scaler backed off: a step overflowed and was skipped
    assert not torch.equal(ckpt["model"]["net.weight"], TinyMethod().net.weight.detach())  # others applied


def test_a_setup_that_never_seeds_builds_the_same_model_in_every_process(tmp_path):
    """torch seeds itself at random per process; the engine seeds before the task's setup runs."""
    initial = []

    def unseeded_setup(cfg, di, device):
        setup = _setup()
        setup.model = TinyMethod(seed=None)  # like a probe head initialised without torch.manual_seed
        initial.append(setup.model.net.weight.detach().clone())
        return setup

    for process_seed in (123, 456):
        torch.manual_seed(process_seed)
        run_training(_cfg(tmp_path / str(process_seed), "train.epochs=1"), unseeded_setup)
    assert torch.equal(initial[0], initial[1])
