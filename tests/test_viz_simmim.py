"""``mimkit visualize --what reconstruction|masks`` on pixel-space methods (SimMIM on ViT and Swin, and
any model with their ``reconstruct`` / ``draw_mask`` interface, as DDMIM): panels against the model's
own reconstruction, the drawn pixels, seeding, and the error of a model without a pixel decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mimkit.checkpoint import save_atomic
from mimkit.cli import main
from mimkit.data import ImageDataset
from mimkit.loading import build_from_checkpoint
from mimkit.methods.simmim import SimMIMReconstruction, patch_mask_to_pixels
from mimkit.registry import create_model
from mimkit.viz import masks as viz_masks, reconstruction as viz_reconstruction
from mimkit.viz.reconstruction import draw_reconstructions, reconstructs_pixels

# ViT: 7x7 patches of 4 px, one patch per 4-px cell, 30 of 49 cells masked. Swin: 14x14 patches of
# 2 px, 4-px cells of 2x2 patches, 30 of 49 cells masked; 3 channels.
MODELS = {
    "vit": {"name": "simmim_vit_tiny_patch4", "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "swin": {"name": "simmim_swin_tiny_28", "in_chans": 3, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]},
    # DDMIM: the same Swin, a per-token Bernoulli mask (its count varies per image)
    "ddmim": {"name": "ddmim_swin_tiny_28", "in_chans": 3, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]},
}
STATS = {1: {"mean": [0.4], "std": [0.25]}, 3: {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}
NUM_TEST = 10


def _npz(path: Path, chans: int, rng) -> Path:
    shape = (NUM_TEST, 28, 28) + ((chans,) if chans > 1 else ())
    splits = {s: rng.integers(0, 256, shape, dtype=np.uint8) for s in ("train", "val", "test")}
    np.savez(path, **{f"{s}_images": x for s, x in splits.items()},
             **{f"{s}_labels": np.zeros((NUM_TEST, 1), dtype=np.int64) for s in splits})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Grey and RGB npz files, and mimkit checkpoints of randomly initialised tiny SimMIM ViT / Swin and iBOT."""
    root = tmp_path_factory.mktemp("viz_simmim")
    rng = np.random.default_rng(0)
    data = {c: _npz(root / f"c{c}.npz", c, rng) for c in (1, 3)}
    torch.manual_seed(0)
    configs = {**MODELS, "ibot": {"name": "ibot_vit_tiny_patch4", "in_chans": 1, "embed_dim": 32, "depth": 1,
                                  "num_heads": 2}}
    for key, cfg in configs.items():
        save_atomic({"format": "mimkit", "model_config": cfg, "model": create_model(**cfg).state_dict(),
                     "data_stats": STATS[cfg["in_chans"]], "task": "pretrain", "epoch": 0}, root / f"{key}.pt")
    return root, data


def _spy(monkeypatch, module, name: str) -> list:
    """Record the arguments of ``module.name`` (and still call it)."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def _visualize(world, family: str, what: str, out: Path, seed: int, monkeypatch):
    """Run the CLI; return (the panel dict it drew, the matplotlib figure it saved)."""
    root, data = world
    module, drawer = ((viz_reconstruction, "save_reconstruction_figure") if what == "reconstruction"
                      else (viz_masks, "save_mask_figure"))
    panels, figures = _spy(monkeypatch, module, drawer), _spy(monkeypatch, module, "save_figure")
    code = main(["visualize", "--what", what, "--checkpoint", str(root / f"{family}.pt"), "--data",
                 str(data[MODELS[family]["in_chans"]]), "--out", str(out), "--num-images", "3", "--seed", str(seed)])
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.undo()
    drawn = panels[-1][0] if what == "reconstruction" else panels[-1][1]
    return drawn, figures[-1][0]


def _hand_images(world, family: str, seed: int) -> tuple[list[int], torch.Tensor]:
    """The figure's test images, picked and normalised by hand: [3, C, 28, 28]."""
    root, data = world
    chans = MODELS[family]["in_chans"]
    idx = torch.randperm(NUM_TEST, generator=torch.Generator().manual_seed(seed))[:3].tolist()
    x = torch.from_numpy(np.load(data[chans])["test_images"][idx]).double() / 255
    x = x[:, None] if chans == 1 else x.permute(0, 3, 1, 2)
    mean, std = (torch.tensor(STATS[chans][k], dtype=torch.float64)[:, None, None] for k in ("mean", "std"))
    return idx, ((x - mean) / std).float()


@pytest.mark.parametrize("family", ["vit", "swin", "ddmim"])
def test_reconstruction_panels_are_the_models_reconstruction_pasted_into_the_image(world, family, tmp_path,
                                                                                 monkeypatch):
    panels, fig = _visualize(world, family, "reconstruction", tmp_path / "rec.png", 7, monkeypatch)
    _, images = _hand_images(world, family, 7)
    assert torch.allclose(panels["original"], images, atol=1e-5)
    pixel_mask = panels["mask"]
    assert pixel_mask.shape == images.shape
    if family != "ddmim":  # SimMIM: 30 of the 49 4-px cells masked per image, in every channel
        assert (pixel_mask.sum(dim=(1, 2, 3)) == 30 * 16 * images.shape[1]).all()
    # The patch mask back from the pixels, and the model's own reconstruction under it.
    model, _ = build_from_checkpoint(Path(world[0]) / f"{family}.pt")
    p = model.patch_size
    mask = pixel_mask[:, 0, ::p, ::p].flatten(1).bool()
    with torch.no_grad():
        rec = model.reconstruct(panels["original"], mask=mask)
    assert torch.equal(patch_mask_to_pixels(mask, (28 // p, 28 // p), p).expand_as(images), pixel_mask)
    masked = pixel_mask == 1
    assert torch.equal(panels["reconstruction"], rec.pred)
    assert torch.equal(panels["masked"][~masked], panels["original"][~masked])
    assert (panels["masked"][masked] == 0).all()
    assert torch.equal(panels["reconstruction + visible"][~masked], panels["original"][~masked])
    assert torch.equal(panels["reconstruction + visible"][masked], rec.pred[masked])
    # The drawn "masked" cell of row 0: the de-normalised image on visible pixels, grey 0.5 on masked ones.
    mean, std = (torch.tensor(STATS[images.shape[1]][k])[:, None, None] for k in ("mean", "std"))
    shown = (images[0] * std + mean).clamp(0, 1)
    expected = torch.where(masked[0], torch.full_like(shown, 0.5), shown)
    expected = expected[0] if images.shape[1] == 1 else expected.permute(1, 2, 0)
    drawn = np.asarray(fig.axes[1].get_images()[0].get_array())
    assert np.allclose(drawn, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "swin", "ddmim"])
def test_masks_figure_shows_the_reconstructions_masks_and_the_seed_decides_them(world, family, tmp_path,
                                                                               monkeypatch):
    rec, _ = _visualize(world, family, "reconstruction", tmp_path / "rec.png", 7, monkeypatch)
    masks, fig = _visualize(world, family, "masks", tmp_path / "m7.png", 7, monkeypatch)
    again, _ = _visualize(world, family, "masks", tmp_path / "m7b.png", 7, monkeypatch)
    # another --seed that picks one of the same images: that image gets another mask
    idx7 = _hand_images(world, family, 7)[0]
    seed = next(s for s in range(8, 100) if set(_hand_images(world, family, s)[0]) & set(idx7))
    other, _ = _visualize(world, family, "masks", tmp_path / "m8.png", seed, monkeypatch)
    p = build_from_checkpoint(Path(world[0]) / f"{family}.pt")[0].patch_size
    assert masks["mask"].shape == (3, 28 // p, 28 // p)
    assert torch.equal(masks["mask"], rec["mask"][:, 0, ::p, ::p])  # same --seed: the same masks in both figures
    assert torch.equal(again["mask"], masks["mask"])
    idx = _hand_images(world, family, seed)[0]
    shared = [i for i in idx if i in idx7]
    assert all(not torch.equal(other["mask"][idx.index(i)], masks["mask"][idx7.index(i)]) for i in shared)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["image", "mask"]
    assert len(fig.axes) == 3 * 2 and not fig.legends  # two columns, no DAMA colour bar or legend


def test_a_model_without_pixel_reconstruction_gets_one_sentence_and_exit_2(world, tmp_path, capsys):
    root, data = world
    for what, message in (("reconstruction", "has no pixel decoder, so it cannot reconstruct images: the figure "
                                             "needs an MAE, SimMIM or DDMIM checkpoint (or use --what attention)."),
                          ("masks", "is not a DAMA, SimMIM or DDMIM model, so it has no mask figure")):
        out = tmp_path / f"{what}.png"
        assert main(["visualize", "--what", what, "--checkpoint", str(root / "ibot.pt"), "--data", str(data[1]),
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


class _PixelCopier(nn.Module):
    """Not a SimMIM: the pixel-reconstruction interface only (as DDMIM has it); predicts 2 x the image,
    masks the left half of the 7x7 patch grid."""

    img_size, in_chans, patch_size = 28, 1, 4

    def draw_mask(self, images: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> torch.Tensor:
        return (torch.arange(49) % 7 < 3).expand(images.shape[0], -1)

    def reconstruct(self, images, *, mask=None, sample_seeds=None) -> SimMIMReconstruction:
        mask = self.draw_mask(images, sample_seeds) if mask is None else mask
        return SimMIMReconstruction(torch.zeros(()), 2 * images, patch_mask_to_pixels(mask, (7, 7), 4), mask)


def test_any_model_with_the_interface_draws_and_mae_does_not_count_as_one(tmp_path, monkeypatch):
    assert reconstructs_pixels(_PixelCopier())
    assert reconstructs_pixels(create_model(**MODELS["vit"])) and reconstructs_pixels(create_model(**MODELS["swin"]))
    assert not reconstructs_pixels(create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1))
    assert not reconstructs_pixels(create_model("vit_tiny_patch4", depth=1))
    ds = ImageDataset(np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4))
    calls = _spy(monkeypatch, viz_reconstruction, "save_reconstruction_figure")
    assert draw_reconstructions(_PixelCopier(), ds, [0.5], [0.5], tmp_path / "r.png", num_images=2).is_file()
    panels = calls[0][0]
    left = torch.arange(28) < 12  # patch columns 0..2
    x = panels["original"]
    assert torch.equal(panels["reconstruction + visible"][..., left], 2 * x[..., left])
    assert torch.equal(panels["reconstruction + visible"][..., ~left], x[..., ~left])
