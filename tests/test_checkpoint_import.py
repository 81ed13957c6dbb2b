"""Checkpoint import: every supported layout is detected and loads into the same encoder; the encoder a
file holds several of is the one asked for; a guessed head count is said; bad files get one message."""

import argparse

import pytest
import timm
import torch

from mimkit.checkpoint import encoder_state
from mimkit.errors import CheckpointError
from mimkit.loading import detect_format, load_encoder
from mimkit.methods.mae import MAE
from mimkit.models.classifier import ViTClassifier
from mimkit.models.vit import MaskedViT

ARCH = dict(img_size=28, patch_size=4, in_chans=3, embed_dim=64, depth=2, num_heads=1)


def _tiny_mae(seed: int) -> MAE:
    torch.manual_seed(seed)
    model = MAE(**ARCH, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=1).eval()
    model.norm.weight.data.uniform_(0.5, 1.5)  # non-trivial final norm, so a dropped norm would show
    return model


@pytest.fixture(scope="module")
def mae():
    return _tiny_mae(0)


@pytest.fixture(scope="module")
def other_mae():
    """A second encoder of the same shape with other weights: the one that must not be picked."""
    return _tiny_mae(1)


def _is_chosen(encoder, chosen, other) -> bool:
    """``encoder`` computes ``chosen``'s features and not ``other``'s."""
    return _same_encoder(encoder, chosen) and not _same_encoder(encoder, other)


def _save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _same_encoder(encoder, reference, x=None):
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)) if x is None else x
    with torch.no_grad():
        return torch.allclose(encoder.encode(x).tokens, reference.encode(x).tokens, atol=1e-5)


@pytest.mark.parametrize("layout,expected", [
    ("encoder", "mae-encoder"), ("full", "mae-full"), ("ddp", "mae-encoder"), ("bare", "mae-encoder"),
])
def test_official_mae_layouts(mae, tmp_path, layout, expected):
    state = {"encoder": encoder_state(mae), "full": mae.state_dict(), "bare": encoder_state(mae),
             "ddp": {"module." + k: v for k, v in encoder_state(mae).items()}}[layout]
    obj = state if layout == "bare" else {"model": state}
    assert detect_format(obj) == expected
    encoder, stats = load_encoder(_save(tmp_path, obj))  # architecture inferred from the shapes
    assert stats is None and encoder.depth == 2 and encoder.embed_dim == 64 and encoder.patch_size == 4
    assert _same_encoder(encoder, mae)


def test_finetuned_mae_uses_fc_norm_as_final_norm(tmp_path):
    torch.manual_seed(0)
    clf = ViTClassifier(num_classes=5, **ARCH).eval()
    clf.fc_norm.weight.data.uniform_(0.5, 1.5)
    obj = {"model": clf.state_dict()}
    assert detect_format(obj) == "mae-finetuned"
    encoder, _ = load_encoder(_save(tmp_path, obj))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        last = encoder.encode(x, return_blocks=[1]).blocks[1]
        # the fc_norm weights become the encoder's final norm; pooled then normalised = the classifier's features
        assert torch.allclose(encoder.norm(last[:, 1:].mean(1)), clf.features(x), atol=1e-5)


def test_timm_vit_state_dict(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, embed_dim=64,
                            depth=2, num_heads=1, num_classes=7).eval()
    obj = vit.state_dict()
    assert detect_format(obj) == "timm-vit"
    encoder, _ = load_encoder(_save(tmp_path, obj))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(encoder.encode(x).tokens, vit.forward_features(x), atol=1e-5)


def test_dino_teacher_checkpoint_gives_the_encoder_asked_for(mae, other_mae, tmp_path):
    def entry(model):
        state = {"module.backbone." + k: v for k, v in encoder_state(model).items()}
        return {**state, "module.head.last_layer.weight": torch.zeros(10, 64)}

    obj = {"teacher": entry(mae), "student": entry(other_mae), "epoch": 3}
    assert detect_format(obj) == "dino-teacher"
    path = _save(tmp_path, obj)
    assert _is_chosen(load_encoder(path)[0], mae, other_mae)  # the teacher by default (DINO/iBOT protocol)
    assert _is_chosen(load_encoder(path, encoder="teacher")[0], mae, other_mae)
    assert _is_chosen(load_encoder(path, encoder="student")[0], other_mae, mae)
    with pytest.raises(CheckpointError, match="no encoder 'ema'"):
        load_encoder(path, encoder="ema")


def test_original_dama_checkpoint_gives_the_student_asked_for(mae, other_mae, tmp_path):
    state = {"module.base_encoder." + k: v for k, v in mae.state_dict().items()}  # student 1
    state.update({"module.momentum_encoder." + k: v for k, v in other_mae.state_dict().items()})  # student 2
    obj = {"model": state}
    assert detect_format(obj) == "dama-original"
    path = _save(tmp_path, obj)
    assert _is_chosen(load_encoder(path)[0], mae, other_mae)  # student 1 by default
    assert _is_chosen(load_encoder(path, encoder="student1")[0], mae, other_mae)
    assert _is_chosen(load_encoder(path, encoder="student2")[0], other_mae, mae)
    with pytest.raises(CheckpointError, match="no encoder 'teacher'"):
        load_encoder(path, encoder="teacher")


def test_a_head_count_that_is_not_the_guess(tmp_path, capsys):
    """Width 192 with 4 heads: the weights cannot tell (qkv is [3D, D] for any head count), the loader
    guesses ViT-Ti's 3, says so, and the right count (override or preset) reproduces the source exactly."""
    torch.manual_seed(0)
    source = MaskedViT(img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=2, num_heads=4).eval()
    path = _save(tmp_path, {"model": encoder_state(source)})
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    guessed, _ = load_encoder(path)
    assert guessed.num_heads == 3 and not _same_encoder(guessed, source, x)  # a wrong count is detectable
    note = capsys.readouterr().out
    assert "3 attention heads assumed for width 192" in note and "--model" in note
    for encoder, _ in (load_encoder(path, num_heads=4), load_encoder(path, "vit_tiny_patch4", depth=2, in_chans=1,
                                                                     num_heads=4)):
        assert encoder.num_heads == 4 and _same_encoder(encoder, source, x)
    assert "heads assumed" not in capsys.readouterr().out  # nothing was guessed


def test_mismatch_is_one_readable_message(mae, tmp_path):
    state = encoder_state(mae)
    state.pop("blocks.1.mlp.fc2.bias")
    state["blocks.0.extra_scale"] = torch.ones(3)
    with pytest.raises(CheckpointError) as err:
        load_encoder(_save(tmp_path, {"model": state}))
    text = str(err.value)
    assert "missing 1 keys (e.g. blocks.1.mlp.fc2.bias)" in text and "unexpected 1 keys (e.g. blocks.0.extra_scale)" in text
    assert "\n" not in text and "(mae-encoder)" in text


def test_not_a_vit_and_pickled_files(tmp_path):
    with pytest.raises(CheckpointError, match="no ViT weights"):
        load_encoder(_save(tmp_path, {"model": {"conv1.weight": torch.zeros(2, 2)}}))
    path = _save(tmp_path, {"model": {"cls_token": torch.zeros(1, 1, 8)}, "args": argparse.Namespace(lr=1)})
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_encoder(path)


def test_preset_name_overrides_inference(mae, tmp_path):
    """--model NAME builds the preset; a checkpoint of another size is refused with a shape message."""
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_encoder(_save(tmp_path, {"model": encoder_state(mae)}), "vit_tiny_patch4")
