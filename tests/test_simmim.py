"""SimMIM: the cell mask, the masked L1 loss, the pixel-shuffle head on ViT and Swin, presets, recipes."""

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mimkit.checkpoint import load_file
from mimkit.config import from_dict, load_config
from mimkit.data import ImageDataset
from mimkit.engine.distributed import DistInfo
from mimkit.engine.optim import param_groups
from mimkit.engine.trainer import TrainingSetup, train_loop
from mimkit.masking import simmim_mask, simmim_mask_geometry
from mimkit.methods.simmim import PRESET_ARGS, SimMIMSwin, SimMIMViT, masked_l1_loss
from mimkit.models.swin import PRESET_ARGS as SWIN_PRESET_ARGS
from mimkit.registry import _docstring_args

REPO = Path(__file__).resolve().parent.parent
SEEDS = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79])


def tiny_vit(in_chans: int = 3) -> SimMIMViT:
    """32 px, 4-px patches (8x8 grid), 8-px mask cells: 4x4 cells of 2x2 patches, 10 masked."""
    return SimMIMViT(img_size=32, patch_size=4, in_chans=in_chans, embed_dim=32, depth=2, num_heads=2,
                     drop_path_rate=0.0, mask_patch_size=8, mask_ratio=0.6)


def tiny_swin(in_chans: int = 3) -> SimMIMSwin:
    """28 px, 2-px patches (14x14 grid), 2 stages (output stride 4), 4-px cells: 7x7 cells of 2x2 patches."""
    return SimMIMSwin(img_size=28, patch_size=2, in_chans=in_chans, embed_dim=16, depths=(1, 1), num_heads=(2, 2),
                      window_size=7, mask_patch_size=4, mask_ratio=0.6)


BUILDERS = {"vit": tiny_vit, "swin": tiny_swin}


def mask_token(model) -> torch.Tensor:
    return model.encoder.masked_embed if model.encoder.family == "vit" else model.encoder.mask_token


def images_for(model, n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.in_chans, model.img_size, model.img_size, generator=g)


# -- the mask ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,patch,cell,ratio,count", [
    ((7, 7), 4, 4, 0.6, 30),      # the 28-px ViT-T/4 preset: one patch per cell
    ((14, 14), 16, 32, 0.6, 30),  # ViT-B/16 at 224: 7x7 cells of 2x2 patches
    ((48, 48), 4, 32, 0.6, 22),   # Swin-B at 192: 6x6 cells of 8x8 patches, ceil(21.6)
    ((6, 9), 4, 12, 0.5, 3),      # not square: 2x3 cells (rows and columns must not swap)
    ((5, 5), 4, 4, 0.28, 7),      # 25 x 0.28 is 7.000000000000001 in floats: still 7 cells
])
def test_mask_masks_exactly_ceil_cells_and_every_cell_is_uniform(grid, patch, cell, ratio, count):
    h, w = grid
    s = cell // patch
    mask = simmim_mask(SEEDS, len(SEEDS), grid, patch, cell, ratio)
    assert mask.dtype == torch.bool and mask.shape == (len(SEEDS), h * w)
    coarse = mask.reshape(-1, h, w)[:, ::s, ::s]  # the top-left patch of every cell
    assert coarse.sum(dim=(1, 2)).tolist() == [count] * len(SEEDS)
    twin = coarse.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2).reshape(len(SEEDS), -1)
    assert torch.equal(mask, twin)  # every patch of a cell has the cell's value
    assert simmim_mask_geometry(grid, patch, cell, ratio) == ((h // s, w // s), s, count)


def test_mask_cells_are_drawn_per_sample_not_fixed():
    mask = simmim_mask(torch.arange(200), 200, (7, 7), 4, 4, 0.6)
    rate = mask.float().mean(dim=0)  # each cell is masked in ~60 % of the samples
    assert rate.min() > 0.4 and rate.max() < 0.8
    assert len({tuple(row.tolist()) for row in mask}) == 200


def test_same_seed_gives_the_same_mask_in_another_batch_and_none_uses_torch_rng():
    full = simmim_mask(SEEDS, 8, (14, 14), 16, 32, 0.6)
    pick = torch.tensor([5, 2, 0])
    assert torch.equal(simmim_mask(SEEDS[pick], 3, (14, 14), 16, 32, 0.6), full[pick])
    assert not torch.equal(full[0], full[1])
    assert not torch.equal(simmim_mask(SEEDS, 8, (14, 14), 16, 32, 0.6, stream=1), full)
    torch.manual_seed(7)
    a = simmim_mask(None, 8, (14, 14), 16, 32, 0.6)
    torch.manual_seed(7)
    assert torch.equal(a, simmim_mask(None, 8, (14, 14), 16, 32, 0.6))
    assert a.reshape(8, 14, 14)[:, ::2, ::2].sum(dim=(1, 2)).tolist() == [30] * 8


def test_mask_geometry_errors_are_one_sentence():
    with pytest.raises(ValueError, match="not a multiple of the model's patch size 4"):
        simmim_mask(None, 2, (7, 7), 4, 6)
    with pytest.raises(ValueError, match=r"28x28-px image does not tile into 8-px mask cells.*\[4, 28\]"):
        simmim_mask(None, 2, (7, 7), 4, 8)
    with pytest.raises(ValueError, match=r"mask_ratio must lie in \(0, 1\)"):
        simmim_mask(None, 2, (7, 7), 4, 4, 1.0)
    with pytest.raises(ValueError, match="masks all 1 mask cells"):
        simmim_mask(None, 2, (2, 2), 4, 8, 0.5)
    with pytest.raises(ValueError, match="does not tile"):  # the model refuses at build time
        SimMIMViT(img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2, mask_patch_size=8)


# -- the loss ----------------------------------------------------------------------------------------

def test_loss_is_the_l1_error_per_masked_pixel_value():
    target = torch.arange(1.0, 9.0).reshape(1, 2, 2, 2)  # C = 2: [[1, 2], [3, 4]] and [[5, 6], [7, 8]]
    pred = torch.zeros_like(target)
    two = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # pixels (0,0) and (1,1): errors 1, 4, 5, 8
    loss = masked_l1_loss(pred, target, two).item()
    assert loss == pytest.approx(18 / ((2 + 1e-5) * 2), rel=1e-6)
    assert loss != pytest.approx(18 / (2 + 1e-5), rel=1e-3)  # in_chans left out of the denominator
    assert loss != pytest.approx(18 / 8, rel=1e-3)  # a mean over all pixels (DDMIM's reduction)
    one = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])  # one masked pixel: the 1e-5 is visible
    loss = masked_l1_loss(pred, target, one).item()
    assert loss == pytest.approx(12 / ((1 + 1e-5) * 2), rel=1e-7)
    assert loss != pytest.approx(6.0, rel=1e-6)
    assert masked_l1_loss(pred, target, torch.zeros_like(one)).item() == 0.0  # no NaN


def test_loss_averages_over_the_batch_masked_pixels_not_per_sample():
    target = torch.arange(1.0, 9.0).reshape(2, 1, 2, 2)  # sample 0: 1..4, sample 1: 5..8, C = 1
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]).reshape(2, 1, 2, 2)
    loss = masked_l1_loss(torch.zeros_like(target), target, mask).item()
    assert loss == pytest.approx((1 + 5 + 6 + 7) / (4 + 1e-5), rel=1e-6)
    assert loss != pytest.approx((1 / 1 + 18 / 3) / 2, rel=1e-3)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_model_loss_uses_its_seeded_mask_upsampled_to_pixels(family):
    model = BUILDERS[family]().eval()
    x = images_for(model)
    rec = model.reconstruct(x, sample_seeds=SEEDS[:4])
    p, grid = model.patch_size, model.encoder.grid_size
    assert torch.equal(rec.mask, simmim_mask(SEEDS[:4], 4, grid, p, model.mask_patch_size, 0.6))
    twin = rec.mask.reshape(4, 1, *grid).float().repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
    assert torch.equal(rec.pixel_mask, twin)
    cells = simmim_mask_geometry(grid, p, model.mask_patch_size, 0.6)[2]
    assert rec.pixel_mask.sum(dim=(1, 2, 3)).tolist() == [cells * model.mask_patch_size**2] * 4
    by_hand = ((rec.pred - x).abs() * twin).sum() / ((twin.sum() + 1e-5) * model.in_chans)
    assert rec.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert model(x, SEEDS[:4]).loss.item() == pytest.approx(rec.loss.item(), rel=1e-6)


# -- the head and the encoder path -------------------------------------------------------------------

@pytest.mark.parametrize("family,in_chans", [("vit", 1), ("vit", 2), ("swin", 2)])
def test_decoder_is_a_1x1_conv_to_stride2_x_chans_shuffled_to_the_image(family, in_chans):
    model = BUILDERS[family](in_chans)
    stride = model.encoder.output_stride
    assert stride == model.patch_size * (1 if family == "vit" else 2)  # Swin: 2 stages, one patch merging
    conv, shuffle = model.decoder
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (model.encoder.feature_dim,
                                                                       stride**2 * in_chans, (1, 1))
    assert shuffle.upscale_factor == stride
    x = images_for(model, n=3)
    assert model.reconstruct(x, sample_seeds=SEEDS[:3]).pred.shape == x.shape


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_masked_pixels_never_reach_the_encoder(family):
    model = BUILDERS[family]().eval()
    x = images_for(model)
    rec = model.reconstruct(x, sample_seeds=SEEDS[:4])
    noise = 10 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    hidden = model.reconstruct(x + noise * rec.pixel_mask, mask=rec.mask)
    assert torch.equal(hidden.pred, rec.pred)  # the prediction cannot see masked content...
    assert hidden.loss.item() != pytest.approx(rec.loss.item(), rel=1e-3)  # ...which is the target
    y, xx = [int(i) for i in torch.nonzero(rec.pixel_mask[0, 0] == 0)[0]]
    shown = x.clone()
    shown[0, :, y, xx] += 1.0  # one visible pixel of image 0 changes that image's prediction only
    seen = model.reconstruct(shown, mask=rec.mask).pred
    assert not torch.allclose(seen[0], rec.pred[0]) and torch.equal(seen[1:], rec.pred[1:])


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_gradients_come_from_masked_pixels_only_and_reach_the_mask_token(family):
    model = BUILDERS[family]()
    x = images_for(model)
    rec = model.reconstruct(x, sample_seeds=SEEDS[:4])
    rec.pred.retain_grad()
    rec.loss.backward()
    masked = rec.pixel_mask.expand_as(x).bool()
    assert torch.all(rec.pred.grad[~masked] == 0)  # visible pixels' predictions are not trained
    step = 1 / ((rec.pixel_mask.sum().item() + 1e-5) * model.in_chans)
    expected = torch.sign(rec.pred - x).detach()[masked] * step
    assert torch.allclose(rec.pred.grad[masked], expected, rtol=1e-5, atol=0)
    assert mask_token(model).grad is not None and mask_token(model).grad.abs().sum() > 0
    assert model.decoder[0].weight.grad.abs().sum() > 0


# -- initialisation and optimiser groups -------------------------------------------------------------

def test_vit_init_is_the_official_simmim_one():
    torch.manual_seed(0)
    model = SimMIMViT(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, mask_patch_size=8)
    blocks = model.encoder.blocks
    for i, block in enumerate(blocks, start=1):
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.fc2.weight.std().item() == pytest.approx(0.02 / (2 * i) ** 0.5, rel=0.05)
        assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / (2 * i) ** 0.5, rel=0.05)
        assert torch.all(block.attn.qkv.bias == 0)
    assert model.encoder.patch_embed.proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    token = model.encoder.masked_embed
    assert token.abs().max() <= 0.02 and token.std() > 0.005  # trunc-normal 0.02 cut at +-0.02


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_tokens_and_bias_tables_get_no_weight_decay(family):
    model = BUILDERS[family]()
    decay, no_decay = (set(map(id, g["params"])) for g in param_groups(model, 0.05))
    assert id(mask_token(model)) in no_decay
    assert id(model.decoder[0].weight) in decay
    if family == "vit":
        assert id(model.encoder.cls_token) in no_decay
    else:
        tables = [p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
        assert tables and all(id(t) in no_decay for t in tables)
    assert model.eval_encoders() == {"encoder": model.encoder}


# -- presets and recipes -----------------------------------------------------------------------------

def test_presets_build_with_documented_arguments_and_the_swin_presets_values():
    for name, (cls, kwargs, description) in PRESET_ARGS.items():
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        assert set(kwargs) <= set(params), name
        documented = {}
        for klass in reversed(cls.__mro__):
            documented.update(_docstring_args(klass.__doc__ or ""))
        assert set(params) <= set(documented), (name, set(params) - set(documented))
        assert name.startswith("simmim_") and description
    swin28 = PRESET_ARGS["simmim_swin_tiny_28"][1]
    assert {k: swin28[k] for k in SWIN_PRESET_ARGS["swin_tiny_patch2_window7_28"][0]} == \
        SWIN_PRESET_ARGS["swin_tiny_patch2_window7_28"][0]


@pytest.mark.parametrize("name,masked_patches", [("simmim_vit_tiny_patch4", 30),  # 30 of 49 4-px patches
                                                 ("simmim_swin_tiny_28", 30 * 4)])  # 30 cells of 2x2 2-px patches
def test_small_image_presets_train_a_step(name, masked_patches):
    cls, kwargs, _ = PRESET_ARGS[name]
    model = cls(**kwargs)
    x = images_for(model, n=2)
    out = model(x, SEEDS[:2])
    out.loss.backward()
    assert torch.isfinite(out.loss) and mask_token(model).grad.abs().sum() > 0
    assert model.reconstruct(x, sample_seeds=SEEDS[:2]).mask.sum(1).tolist() == [masked_patches] * 2


@pytest.mark.parametrize("name,masked_patches", [("simmim_swin_base_patch4_window6_192", 22 * 64),
                                                 ("simmim_vit_base_patch16", 30 * 4)])
def test_paper_presets_have_the_papers_geometry(name, masked_patches):
    cls, kwargs, _ = PRESET_ARGS[name]
    model = cls(**kwargs)
    assert model.decoder[0].out_channels == model.encoder.output_stride**2 * 3
    assert model.encoder.output_stride == (32 if "swin" in name else 16)
    assert int(model.draw_mask(torch.zeros(2, 3, model.img_size, model.img_size), SEEDS[:2]).sum(1)[0]) == \
        masked_patches


# Official BASE_LR per 512 images (microsoft/SimMIM configs/*/simmim_pretrain__*.yaml).
OFFICIAL_BASE_LR = {"swin_base_192_100ep.yaml": 2e-4, "swin_base_192_800ep.yaml": 1e-4, "vit_base_800ep.yaml": 1e-4}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs" / "simmim").glob("*.yaml")))
def test_recipes_name_a_preset_and_valid_keys_and_convert_the_lr(recipe):
    raw = yaml.safe_load((REPO / "configs" / "simmim" / recipe).read_text())
    cls, _, _ = PRESET_ARGS[raw["model"]["name"]]
    assert set(raw["model"]) - {"name"} <= set(inspect.signature(cls.__init__).parameters)
    cfg = from_dict({k: v for k, v in raw.items() if k != "model"})  # data / train keys and ranges
    if recipe in OFFICIAL_BASE_LR:
        # The official lr at batch 2048 (BASE_LR x 2048 / 512) equals mimkit's blr x 2048 / 256.
        assert cfg.train.blr * 2048 / 256 == pytest.approx(OFFICIAL_BASE_LR[recipe] * 2048 / 512)
        assert cfg.train.batch_size * 16 == 2048 and cfg.train.betas == [0.9, 0.999]
    else:  # the 28-px recipe runs on the MAE 28-px recipe's budget
        mae = yaml.safe_load((REPO / "configs" / "mae" / "vit_tiny_p4_28.yaml").read_text())["train"]
        assert [getattr(cfg.train, k) for k in ("epochs", "warmup_epochs", "batch_size")] == \
            [mae["epochs"], mae["warmup_epochs"], mae["batch_size"]]


# -- the engine ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "swin"])
def test_the_training_loop_runs_an_epoch_and_saves_encoder_and_decoder(tmp_path, family):
    torch.manual_seed(0)
    model = BUILDERS[family]()
    side = model.img_size
    data = ImageDataset(np.random.RandomState(0).randint(0, 256, (16, side, side, 3), dtype=np.uint8))
    before = mask_token(model).detach().clone()
    setup = TrainingSetup(model, data, lambda image: (image - 0.5) / 0.25, {"name": f"simmim_{family}_test"},
                          {"mean": [0.5] * 3, "std": [0.25] * 3}, "pretrain", f"SimMIM {family}")
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "train.epochs=1", "train.warmup_epochs=0",
                             "train.batch_size=8", "train.blr=1e-3", "train.betas=[0.9,0.999]", "train.clip_grad=5.0",
                             "train.progress=false", "train.log_every=1"])
    summary = train_loop(cfg, DistInfo(), torch.device("cpu"), setup)
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert not torch.equal(mask_token(model).detach(), before)
    state = load_file(summary["checkpoint"])["model"]
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder"}
