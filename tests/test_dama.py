"""DAMA: adaptive mask invariants, the batch-broadcast compatibility switch, losses and gradients,
checkpoint import, presets, engine run (npz and 7-channel TIFF) and the mask figure."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

import mimkit
from mimkit.checkpoint import load_file
from mimkit.config import load_config
from mimkit.cli import main
from mimkit.engine.trainer import pretrain
from mimkit.errors import CheckpointError, ConfigError
from mimkit.loading import build_from_checkpoint, load_encoder
from mimkit.masking import (
    dama_adaptive_masking, dama_batch_broadcast_masking, dama_mask_sizes, random_masking, uniform_noise,
)
from mimkit.methods.base import eval_encoders, select_encoder
from mimkit.methods.dama import DAMA, _encode_with_mlp_outputs, dama_original_to_mimkit
from mimkit.viz.masks import dama_mask_panels
from tests.conftest import REPO
from tests.reference import cls_features, numpy_weighted_knn, split_tensors

TINY_DAMA = ["model.name=dama_vit_tiny_patch4", "model.depth=2", "model.decoder_depth=1", "model.last_k_blocks=2"]


def tiny_dama(**kw) -> DAMA:
    torch.manual_seed(0)
    return mimkit.create_model("dama_vit_tiny_patch4", depth=2, decoder_depth=1, last_k_blocks=2, **kw)


def _student1_draw(n, length=196, ratio=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    draw1 = random_masking(n, length, ratio, noise=torch.rand(n, length, generator=g))
    error1 = torch.rand(n, length, generator=g) + 0.01  # continuous: no ties
    noise2 = torch.rand(n, length, generator=g)
    return draw1, error1, noise2


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_adaptive_mask_counts_overlap_and_hardest_patches_per_sample(n):
    length = 196
    k, o = dama_mask_sizes(length, 0.8, 0.5)
    assert (k, o) == (39, 19)
    draw1, error1, noise2 = _student1_draw(n)
    draw2 = dama_adaptive_masking(draw1.mask, error1, k, o, noise2)
    m1, m2 = draw1.mask.bool(), draw2.mask.bool()
    assert ((~m2).sum(1) == k).all()  # exactly K visible in every sample
    assert ((~m1 & ~m2).sum(1) == o).all()  # exactly O shared with student 1
    # Student 2's encoder gathers exactly its visible patches.
    assert (torch.gather(draw2.mask, 1, draw2.ids_keep) == 0).all()
    assert torch.equal(draw2.mask.bool(), draw2.ids_restore >= k)  # decoder un-shuffles consistently
    # Among student-1-masked patches, every patch masked for student 2 is harder than every visible one.
    inf = torch.tensor(float("inf"))
    hardest_visible = torch.where(m1 & ~m2, error1, -inf).amax(1)
    easiest_masked = torch.where(m1 & m2, error1, inf).amin(1)
    assert (hardest_visible < easiest_masked).all()
    assert ((m1 & m2).sum(1) == length - 2 * k + o).all()  # H + O hardest
    # Explicit per-sample reference (test only): the L-2K+O largest errors among student 1's masked patches.
    for i in range(min(n, 8)):
        masked = torch.nonzero(m1[i]).flatten()
        top = masked[torch.argsort(error1[i, masked], descending=True)[: length - 2 * k + o]]
        assert set(top.tolist()) == set(torch.nonzero(m1[i] & m2[i]).flatten().tolist())


def test_overlap_is_drawn_at_random_not_by_index_order():
    n, length = 256, 196
    k, o = dama_mask_sizes(length, 0.8, 0.5)
    one = random_masking(1, length, 0.8, noise=torch.rand(1, length, generator=torch.Generator().manual_seed(3)))
    mask1 = one.mask.expand(n, -1)
    draw2 = dama_adaptive_masking(mask1, torch.rand(n, length), k, o, torch.rand(n, length))
    shared = (mask1 == 0) & (draw2.mask == 0)
    frequency = shared.float().mean(0)[mask1[0] == 0]  # how often each of the K visible patches is shared
    assert frequency.min() > 0.3 and frequency.max() < 0.7  # ~ O/K = 0.49 each, not always the first O
    first_o = torch.nonzero(mask1[0] == 0).flatten()[:o]
    assert not (shared[:, first_o].all(1)).all()


def test_compat_switch_reproduces_batch_broadcast_of_original_code():
    length = 196
    k, o = dama_mask_sizes(length, 0.8, 0.5)
    for n, most_masked in ((1, 157), (64, 100)):
        draw1, error1, _ = _student1_draw(n, seed=n)
        got = dama_batch_broadcast_masking(draw1.mask, error1, k, o)
        # Reference: the original index arithmetic, including the [N, O] index applied to every row.
        img_mask, loss = draw1.mask.clone(), error1 * draw1.mask
        take = torch.argsort(loss, dim=1, stable=True)[:, -(length - 2 * k + o):]
        txt = torch.where(img_mask == 1, 0.0, 1.0)
        txt[torch.arange(n)[:, None], take] = 1
        overlap = torch.argsort(img_mask, dim=1, stable=True)[:, :o]
        txt[:, overlap] = 0
        assert torch.equal(got.mask, txt)
        masked = got.mask.sum(1)
        if n == 1:
            assert (masked == length - k).all()  # no broadcast with one sample: as intended
        else:
            assert (masked < most_masked).all()  # most patches become "visible": the bug
        assert got.ids_keep.shape == (n, k) and (torch.gather(got.mask, 1, got.ids_keep) == 0).all()


def test_model_masks_with_compat_switch_depend_on_batch_size():
    images = torch.randn(8, 3, 28, 28)
    fixed, compat = tiny_dama(), tiny_dama(compat_batch_broadcast_overlap_bug=True)
    seeds = torch.arange(8)
    k = fixed.num_keep
    assert ((fixed.step(images, seeds).mask2 == 0).sum(1) == k).all()
    assert ((compat.step(images, seeds).mask2 == 0).sum(1) > k).all()


def test_per_sample_seeds_make_masks_independent_of_the_batch():
    model = tiny_dama().eval()
    images = torch.randn(4, 3, 28, 28)
    seeds = torch.tensor([11, 12, 13, 14])
    with torch.no_grad():
        full = model.step(images, seeds)
        part = model.step(images[2:], seeds[2:])
        again = model.step(images, seeds)
    assert torch.equal(full.mask1[2:], part.mask1) and torch.equal(full.mask2[2:], part.mask2)
    assert torch.equal(full.mask2, again.mask2)
    assert not torch.equal(full.mask1, full.mask2)


def test_all_three_losses_give_gradients_to_the_intended_students():
    model = tiny_dama()
    out = model.step(torch.randn(4, 3, 28, 28), torch.arange(4))

    def grad_norms(loss):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return {name: sum(float(p.grad.abs().sum()) for p in getattr(model, name).parameters() if p.grad is not None)
                for name in ("student1", "student2", "info_head")}

    rec1, rec2, info = grad_norms(out.rec1), grad_norms(out.rec2), grad_norms(out.info)
    assert rec1["student1"] > 0 and rec1["student2"] == 0  # mask 2 uses student 1's error detached
    assert rec2["student2"] > 0 and rec2["student1"] == 0
    assert info["student1"] > 0 and info["student2"] > 0 and info["info_head"] > 0  # no stop-gradient
    total = grad_norms(out.loss)
    assert total["student1"] > 0 and total["student2"] > 0 and total["info_head"] > 0
    torch.testing.assert_close(out.loss, out.rec1 + out.rec2 + out.info)
    # Both encoders' blocks get gradient from the total loss.
    assert model.student1.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.student2.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_stable_epoch_turns_the_info_loss_on_later():
    model = tiny_dama(stable_epoch=2)
    images, seeds = torch.randn(2, 3, 28, 28), torch.arange(2)
    model.set_epoch(1.5)
    early = model.step(images, seeds)
    torch.testing.assert_close(early.loss, early.rec1 + early.rec2)
    model.set_epoch(2.0)
    late = model.step(images, seeds)
    assert late.info > 0
    torch.testing.assert_close(late.loss, late.rec1 + late.rec2 + late.info)


def test_info_loss_alignment_options_match_an_explicit_reference():
    images, seeds = torch.randn(3, 3, 28, 28), torch.arange(3)
    model = tiny_dama(info_token_alignment="cls_overlap", info_loss_reduction="sum")
    with torch.no_grad():
        s1, s2 = model.student1, model.student2
        out = model.step(images, seeds)
        draw1 = s1.draw_mask(3, "cpu", sample_seeds=seeds)
        assert torch.equal(draw1.mask, out.mask1)
        draw2 = model.student2_draw(out.mask1, out.error1, uniform_noise(seeds, 3, model.num_patches, 1, "cpu"))
        t1 = s1.encode(images, ids_keep=draw1.ids_keep).tokens
        _, feats = _encode_with_mlp_outputs(s2, images, draw2.ids_keep, {0, 1})
        # MLP outputs equal MLP(LN2(x)) recomputed from the block inputs.
        blocks = s2.encode(images, ids_keep=draw2.ids_keep, return_blocks=True).blocks
        x_in = blocks[0]
        x_mid = x_in + s2.blocks[1].attn(s2.blocks[1].norm1(x_in))
        torch.testing.assert_close(feats[1], s2.blocks[1].mlp(s2.blocks[1].norm2(x_mid)))
        pred = torch.softmax(model.info_head(t1), -1)
        target = torch.softmax(sum(torch.nn.functional.layer_norm(f, f.shape[-1:]) for f in feats) / 2, -1)
        expected = 0.0
        for i in range(3):  # explicit loop over samples and shared patches (reference only)
            pos1 = {int(p): j + 1 for j, p in enumerate(draw1.ids_keep[i])}
            pos2 = {int(p): j + 1 for j, p in enumerate(draw2.ids_keep[i])}
            shared = sorted(set(pos1) & set(pos2))
            assert len(shared) == model.num_overlap
            pairs = [(0, 0)] + [(pos1[p], pos2[p]) for p in shared]
            for a, b in pairs:
                d = pred[i, a] - target[i, b]
                expected += float(torch.where(d.abs() < 2, 0.5 * d**2 / 2, d.abs() - 1).sum())
        assert float(out.info) == pytest.approx(expected, rel=1e-4)
        written = tiny_dama(info_token_alignment="as_written").step(images, seeds)
        # As written: position-wise over 1 + K tokens.
        d = pred - target  # same weights (seed 0) and masks, so the same tensors
        assert float(written.info) == pytest.approx(float((0.25 * d**2).sum()), rel=1e-4)
        averaged = tiny_dama(info_token_alignment="as_written", info_loss_reduction="mean").step(images, seeds)
        assert float(averaged.info) == pytest.approx(float(written.info) / (3 * (1 + model.num_keep)), rel=1e-4)


def test_random_student2_mask_is_independent_dama_rand():
    model = tiny_dama(student2_mask="random", mask_ratio=0.75)
    out = model.step(torch.randn(64, 3, 28, 28), torch.arange(64))
    k = model.num_keep
    assert ((out.mask2 == 0).sum(1) == k).all() and ((out.mask1 == 0).sum(1) == k).all()
    shared = ((out.mask1 == 0) & (out.mask2 == 0)).sum(1).float()
    assert 1.0 < shared.mean() < 5.0  # K*K/L = 2.9 on average, varying per sample
    assert shared.std() > 0


@pytest.mark.parametrize("override, message", [
    (dict(mask_ratio=0.4), "mask_ratio >= 0.5"),
    (dict(student2_mask="hard"), "student2_mask must be one of"),
    (dict(info_token_alignment="mean"), "info_token_alignment must be one of"),
    (dict(student2_mask="random", compat_batch_broadcast_overlap_bug=True), "only applies"),
])
def test_bad_arguments_raise_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_dama(**override)


def test_original_checkpoint_keys_convert_and_load_strictly():
    model = tiny_dama()
    names = {"student1.": "base_encoder.", "student2.": "momentum_encoder.", "info_head.": "projs_head."}
    original = {}
    for key, value in model.state_dict().items():
        prefix = next(p for p in names if key.startswith(p))
        original["module." + names[prefix] + key[len(prefix):]] = value.clone() + 1
    assert "module.base_encoder.blocks.0.mlp.fc1.weight" in original
    assert "module.projs_head.3.weight" in original and "module.momentum_encoder.decoder_pred.bias" in original
    converted = dama_original_to_mimkit(original)
    fresh = tiny_dama()
    fresh.load_state_dict(converted, strict=True)
    torch.testing.assert_close(fresh.student2.norm.weight, model.student2.norm.weight + 1)
    with pytest.raises(CheckpointError, match="original DAMA"):
        dama_original_to_mimkit({"encoder.cls_token": torch.zeros(1)})


def test_eval_encoders_and_weight_decay_names():
    model = tiny_dama()
    encoders = eval_encoders(model)
    assert list(encoders) == ["student1", "student2"] and encoders["student2"] is model.student2
    assert select_encoder(model) is model.student1 and model.encoder is model.student1
    assert {"student1.cls_token", "student2.pos_embed", "student2.mask_token"} <= model.no_weight_decay()


def test_presets_and_configs():
    assert {"dama_vit_tiny_patch16", "dama_vit_small_patch16", "dama_vit_base_patch16",
            "dama_vit_tiny_patch4"} <= set(mimkit.list_models())
    cfg = load_config(REPO / "configs/dama/main_vit_tiny.yaml")
    assert cfg.model["mask_ratio"] == 0.8 and cfg.model["last_k_blocks"] == 6 and cfg.train.epochs == 500
    assert cfg.train.batch_size == 64 and cfg.train.warmup_epochs == 40 and cfg.model["norm_pix_loss"]
    assert load_config(REPO / "configs/dama/main_vit_base.yaml").model["name"] == "dama_vit_base_patch16"
    small = load_config(REPO / "configs/dama/vit_tiny_p4_28.yaml", ["model.student2_mask=random"])
    assert small.model["student2_mask"] == "random" and small.train.epochs == 40


def test_engine_run_then_knn_of_either_student_and_mask_figure(tmp_path, breast):
    """A real run; the k-NN of each student is checked against a recomputation (a bar such as "above
    40 %" passes for a broken encoder: the majority class of BreastMNIST is 73 %)."""
    out = tmp_path / "run"
    cfg = load_config(None, [*TINY_DAMA, f"data.path={breast}", f"output_dir={out}", "train.epochs=1",
                             "train.warmup_epochs=0", "train.batch_size=128", "train.progress=false",
                             "train.log_every=2", "model.mask_ratio=0.75"])
    summary = pretrain(cfg)
    assert summary["final_epoch"] == 1 and summary["final_rec1"] > 0 and summary["final_info"] > 0
    ckpt = load_file(out / "last.pt")
    assert ckpt["model_config"]["name"] == "dama_vit_tiny_patch4"
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert {"rec1", "rec2", "info"} <= set(records[-1])

    # k-NN of each student: the CLI (--encoder NAME) equals the numpy twin on features taken by hand
    # from that student of the rebuilt model; the students differ from each other and from their init.
    model, _ = build_from_checkpoint(out / "last.pt")
    stats = ckpt["data_stats"]
    train_x, train_y = split_tensors(breast, "train", stats["mean"], stats["std"])
    test_x, test_y = split_tensors(breast, "test", stats["mean"], stats["std"])
    torch.manual_seed(ckpt["config"]["train"]["seed"])  # the initialisation the run started from
    untrained = mimkit.create_model(**ckpt["model_config"])
    queries = {}
    for name in ("student1", "student2"):
        student = getattr(model, name)
        loaded, _ = load_encoder(out / "last.pt", encoder=name)
        assert all(torch.equal(v, student.state_dict()[k]) for k, v in loaded.state_dict().items()), name
        assert main(["knn", "--checkpoint", str(out / "last.pt"), "--data", str(breast), "--encoder", name,
                     "--k", "10", "--out", str(tmp_path / f"{name}.json")]) == 0
        got = json.loads((tmp_path / f"{name}.json").read_text())["accuracy"]["10"]["top1"]
        queries[name] = cls_features(student, test_x)
        assert got == pytest.approx(numpy_weighted_knn(cls_features(student, train_x), train_y, queries[name],
                                                       test_y, 10, 0.07)), name
        assert not torch.allclose(queries[name], cls_features(getattr(untrained, name), test_x), atol=1e-3), name
    assert not torch.allclose(queries["student1"], queries["student2"], atol=1e-3)

    png = tmp_path / "masks.png"
    proc = subprocess.run([sys.executable, "-m", "mimkit", "visualize", "--what", "masks", "--checkpoint",
                           str(out / "last.pt"), "--data", str(breast), "--out", str(png), "--num-images", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert png.is_file() and png.stat().st_size > 5000


def test_mask_figure_panels_agree_with_the_step():
    model = tiny_dama()
    images, seeds = torch.randn(2, 3, 28, 28), torch.tensor([5, 6])
    panels = dama_mask_panels(model, images, seeds)
    out = model.step(images, seeds)
    assert panels["mask2"].shape == (2, 7, 7)
    assert torch.equal(panels["mask2"].flatten(1), out.mask2)
    assert torch.isnan(panels["error1"]).flatten(1).eq(out.mask1 == 0).all()  # only masked patches scored
    shared = (panels["overlap"] == 0).flatten(1).sum(1)
    assert (shared == model.num_overlap).all()


def test_visualize_masks_rejects_a_mae_checkpoint(tmp_path):
    model = mimkit.create_model("mae_vit_tiny_patch4")
    path = tmp_path / "mae.pt"
    torch.save({"model": model.state_dict()}, path)
    proc = subprocess.run([sys.executable, "-m", "mimkit", "visualize", "--what", "masks", "--checkpoint", str(path),
                           "--model", "mae_vit_tiny_patch4", "--data", "digits", "--out", str(tmp_path / "x.png"),
                           "--split", "test"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is not a DAMA, SimMIM or DDMIM model, so it has no mask figure" in proc.stderr


def test_seven_channel_16bit_tiff_folder_pretrains(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cells"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(8):
            tifffile.imwrite(folder / cls / f"{i}.tif", rng.integers(0, 65536, (7, 28, 28), dtype=np.uint16))
    cfg = load_config(None, [*TINY_DAMA, f"data.path={folder}", f"output_dir={tmp_path / 'run'}", "train.epochs=1",
                             "train.warmup_epochs=0", "train.batch_size=8", "train.progress=false",
                             "data.mean=[0,0,0,0,0,0,0]", "data.std=[1,1,1,1,1,1,1]"])
    summary = pretrain(cfg)
    ckpt = load_file(tmp_path / "run" / "last.pt")
    assert ckpt["model_config"]["in_chans"] == 7 and summary["final_loss"] > 0
    assert ckpt["model"]["student2.decoder_pred.weight"].shape[0] == 4 * 4 * 7
