"""k-NN against hand-computed and brute-force references, and the user-facing commands on a tiny checkpoint."""

import json
import math
import os
import re
import socket
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.engine.trainer import pretrain
from mimkit.eval import knn as knn_module
from mimkit.eval.features import extract_features
from mimkit.eval.knn import weighted_knn
from mimkit.loading import build_from_checkpoint
from mimkit.models.vit import MaskedViT
from mimkit.registry import create_model
from mimkit.viz.reconstruction import reconstruction_panels
from tests.conftest import REPO, TINY_MAE, shared_file
from tests.reference import cls_features, numpy_weighted_knn, split_tensors


def test_numpy_twin_matches_weighted_knn_on_random_features():
    g = torch.Generator().manual_seed(0)
    train_x, train_y = torch.randn(300, 16, generator=g), torch.randint(0, 4, (300,), generator=g)
    for num_test in (7, 99, 250):  # fewer than, about and more than one chunk of 64
        test_x, test_y = torch.randn(num_test, 16, generator=g), torch.randint(0, 4, (num_test,), generator=g)
        got = weighted_knn(train_x, train_y, test_x, test_y, k=[1, 5, 20], temperature=0.07, num_classes=4,
                           chunk_size=64)
        for k in (1, 5, 20):
            assert got[k]["top1"] == pytest.approx(numpy_weighted_knn(train_x, train_y, test_x, test_y, k, 0.07))
            assert "top5" not in got[k]


# -- weighted k-NN on a bank whose answer is worked out by hand -------------------------------------
# Four queries, each alone in its own 2-D plane of R^8 (so bank rows of other planes have similarity
# 0 and never enter a top-4). Each plane lists its bank rows as (cosine to the query, norm, label).
T = 0.1
PLANES = [
    # q0, label 1: exp(10 s) votes at k=3 are 1: e^9.5 = 13360 against 0: e^8.5 + e^8.4 = 9362.
    # Without the temperature (e^s: 2.59 vs 4.66) or by majority (1 vs 2) class 0 wins.
    ([(0.95, 1, 1), (0.85, 1, 0), (0.84, 1, 0), (0.30, 1, 0)], 1),
    # q1, label 0: at k=3, 0: e^9.3 + e^9.2 = 20835 beats 1: e^9.5 = 13360; at k=2 (13360 vs 10938)
    # and k=4 (1 gains e^9.1: 22315 vs 20835) class 1 wins.
    ([(0.95, 1, 1), (0.93, 1, 0), (0.92, 1, 0), (0.91, 1, 1)], 0),
    # q2, label 1: by cosine the top-3 is 1, 1, 0; the two long class-0 rows (norm 5: dot products
    # 3.0 and 2.5) would be the nearest by an unnormalised dot product.
    ([(0.95, 1, 1), (0.90, 1, 1), (0.60, 5, 0), (0.50, 5, 0)], 1),
    # q3, label 0: at T = 0.1, 0: e^9 + e^8.9 = 15435 beats 1: e^9.5 = 13360; at the default
    # T = 0.07 (a temperature argument that is ignored) or T = 0.05 (queries, of norm 2, not
    # normalised) class 1 wins.
    ([(0.95, 1, 1), (0.90, 1, 0), (0.89, 1, 0), (0.20, 1, 1)], 0),
]


def _hand_vote(rows, k: int, temperature: float | None) -> int:
    """Class with the largest sum of exp(s / T) over the k rows of largest s (T None: one vote each)."""
    votes = [0.0, 0.0]
    for s, _, label in sorted(rows, key=lambda r: -r[0])[:k]:
        votes[label] += 1.0 if temperature is None else math.exp(s / temperature)
    return int(votes[1] > votes[0])


def _hand_bank(planes=PLANES):
    """Bank rows, labels, queries (norm 2) and query labels from ``planes``: plane p is dims 2p, 2p+1."""
    dim = 2 * len(planes)
    bank, bank_y, queries, query_y = [], [], [], []
    for p, (rows, label) in enumerate(planes):
        q = torch.zeros(dim)
        q[2 * p] = 2.0
        queries.append(q)
        query_y.append(label)
        for cos, norm, y in rows:
            v = torch.zeros(dim)
            v[2 * p], v[2 * p + 1] = norm * cos, norm * math.sqrt(1 - cos**2)
            bank.append(v)
            bank_y.append(y)
    return torch.stack(bank), torch.tensor(bank_y), torch.stack(queries), torch.tensor(query_y)


def test_the_hand_made_bank_separates_each_plausible_bug():
    """The worked example really tells the right protocol from each wrong one (a check on the example)."""
    for rows, label in PLANES:
        assert _hand_vote(rows, 3, T) == label
    wrong = {
        "no temperature (T=1)": [_hand_vote(r, 3, 1.0) for r, _ in PLANES],
        "majority vote": [_hand_vote(r, 3, None) for r, _ in PLANES],
        "k-1": [_hand_vote(r, 2, T) for r, _ in PLANES],
        "k+1": [_hand_vote(r, 4, T) for r, _ in PLANES],
        "default T=0.07": [_hand_vote(r, 3, 0.07) for r, _ in PLANES],
        # raw dot products: the row norms and the query norm 2 scale the similarities
        "dot product": [_hand_vote([(2 * c * n, n, y) for c, n, y in r], 3, T) for r, _ in PLANES],
        "query not normalised": [_hand_vote([(2 * c, n, y) for c, n, y in r], 3, T) for r, _ in PLANES],
    }
    labels = [label for _, label in PLANES]
    for bug, predictions in wrong.items():
        assert predictions != labels, bug


def test_weighted_knn_equals_the_hand_computation():
    bank, bank_y, queries, query_y = _hand_bank()
    res = weighted_knn(bank, bank_y, queries, query_y, k=[2, 3], temperature=T, num_classes=2)
    assert res[3]["top1"] == 100.0  # every query as worked out above
    assert res[2]["top1"] == 50.0  # k=2: q1 and q3 go to class 1 (see PLANES), q0 and q2 stay right


def test_weighted_knn_small_temperature_keeps_the_nearest_class():
    """T = 0.01 on similarities near 1: exp(s / T) ~ e^100 overflows float32, so the votes must be
    taken relative to the best similarity. By hand: the nearest row (s = 1) gets weight 1, the
    two others e^-3 + e^-4 = 0.07 together, so the nearest row's class wins in both planes."""
    rows = lambda near, far: [(1.0, 1, near), (0.97, 1, far), (0.96, 1, far)]  # noqa: E731
    planes = [(rows(0, 1), 0), (rows(1, 0), 1)]
    bank, bank_y, queries, query_y = _hand_bank(planes)
    assert weighted_knn(bank, bank_y, queries, query_y, k=[3], temperature=0.01, num_classes=2)[3]["top1"] == 100.0


def test_knn_top5_and_clamped_k():
    x = torch.eye(8)
    res = weighted_knn(x, torch.arange(8), x, torch.arange(8), k=[1, 100], num_classes=8)
    assert res[1]["top1"] == 100.0 and res[8]["top5"] == 100.0 and 100 not in res


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    breast = shared_file("breastmnist.npz")
    out = tmp_path_factory.mktemp("tiny")
    pretrain(load_config(None, [*TINY_MAE, f"data.path={breast}", f"output_dir={out}", "train.epochs=1",
                                "train.warmup_epochs=0", "train.batch_size=64", "train.progress=false"]))
    return out / "last.pt", breast


def test_knn_command_equals_a_numpy_twin_of_the_same_features(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    assert main(["knn", "--checkpoint", str(ckpt), "--data", str(data), "--k", "1", "6", "21", "--temperature", "0.02",
                 "--out", str(tmp_path / "knn.json")]) == 0
    text = capsys.readouterr().out
    assert "546 train / 156 test" in text
    result = json.loads((tmp_path / "knn.json").read_text())
    # The twin: the encoder rebuilt from the checkpoint, images normalised by hand, numpy k-NN.
    model, obj = build_from_checkpoint(ckpt)
    stats = obj["data_stats"]
    train_x, train_y = split_tensors(data, "train", stats["mean"], stats["std"])
    test_x, test_y = split_tensors(data, "test", stats["mean"], stats["std"])
    bank, queries = cls_features(model.encoder, train_x), cls_features(model.encoder, test_x)
    for k in (1, 6, 21):  # on this checkpoint k=21 at T=0.02 differs from T=1, T=0.07 and a majority vote
        expected = numpy_weighted_knn(bank, train_y, queries, test_y, k, 0.02)
        assert result["accuracy"][str(k)]["top1"] == pytest.approx(expected), k
        assert f"{k:>6} {expected:8.2f}" in text  # the printed table shows the same numbers


def test_visualize_writes_png(tiny_checkpoint, tmp_path):
    ckpt, data = tiny_checkpoint
    out = tmp_path / "rec.png"
    assert main(["visualize", "--what", "reconstruction", "--checkpoint", str(ckpt), "--data", str(data),
                 "--out", str(out), "--num-images", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _hand_denormalised(pred: torch.Tensor, images: torch.Tensor, p: int) -> torch.Tensor:
    """[N, L, p*p*C] norm-pix predictions -> [N, C, H, W] pixels, one patch at a time (float64).

    Patch l = i * (W/p) + j holds pixels (row, col, channel) of block (i, j); each is mapped back
    with its original patch's mean and unbiased variance: pred * sqrt(var + 1e-6) + mean.
    """
    n, c, h, w = images.shape
    out = torch.zeros(n, c, h, w, dtype=torch.float64)
    for b in range(n):
        for i in range(h // p):
            for j in range(w // p):
                block = images[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].double()  # [C, p, p]
                pixels = block.permute(1, 2, 0).reshape(-1)
                mean = pixels.sum() / pixels.numel()
                var = ((pixels - mean) ** 2).sum() / (pixels.numel() - 1)
                patch = pred[b, i * (w // p) + j].double() * (var + 1e-6).sqrt() + mean
                out[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = patch.reshape(p, p, c).permute(2, 0, 1)
    return out


def test_reconstruction_panels_denormalise_norm_pix(tiny_checkpoint):
    model, _ = build_from_checkpoint(tiny_checkpoint[0])
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 1, 28, 28, generator=g)
    # Every other patch is almost flat (variance ~1e-6): there the eps 1e-6 changes the scale by ~40 %,
    # so a wrong eps (0, 1e-5) shows; the other patches show a biased variance (a 3 % change).
    flat = 0.3 + 1e-3 * torch.randn(2, 1, 28, 28, generator=g)
    checker = ((torch.arange(28) // 4)[:, None] + (torch.arange(28) // 4)[None, :]) % 2 == 0
    images = torch.where(checker, flat, images)
    noise = torch.rand(2, 49, generator=g)
    panels = reconstruction_panels(model, images, noise)
    pred = model.reconstruct(images, noise=noise).pred
    expected = _hand_denormalised(pred, images, 4)
    masked = panels["mask"] == 1
    assert panels["mask"].sum() == 2 * (49 - 12) * 16  # 12 of 49 patches visible per image
    assert torch.equal(panels["reconstruction + visible"][~masked], images[~masked])  # pasted from the original
    assert torch.allclose(panels["reconstruction + visible"][masked].double(), expected[masked], rtol=0, atol=1e-5)
    assert torch.allclose(panels["reconstruction"].double(), expected, rtol=0, atol=1e-5)


def test_pickled_checkpoint_needs_explicit_flag(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    legacy = tmp_path / "legacy.pth"
    obj = torch.load(ckpt, weights_only=True)
    obj["args"] = Namespace(lr=1.0)  # like official MAE training checkpoints
    torch.save(obj, legacy)
    assert main(["knn", "--checkpoint", str(legacy), "--data", str(data), "--k", "5"]) == 2
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and "run code" in err
    assert main(["knn", "--checkpoint", str(legacy), "--data", str(data), "--k", "5", "--allow-pickle"]) == 0


@pytest.mark.parametrize("args,message", [
    (["pretrain", "train.epohcs=2"], "Did you mean train.epochs"),
    (["pretrain", "data.path=/no/such/folder"], "/no/such/folder"),
    (["knn", "--checkpoint", "/no/such.pt", "--data", "digits"], "does not exist"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "mimkit", *args, *([f"output_dir={tmp_path / 'o'}"] if args[0] == "pretrain" else [])],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_demo_numbers_equal_a_recomputation_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    """The demo's two k-NN numbers equal the numpy twin on the features it extracted, and those features
    are the saved networks' (spot-checked on 64 images per split: encoding all of digits twice more
    with a 12-block ViT would double the test's time)."""
    extracted = []  # (features, labels) of: untrained train, untrained test, pretrained train, pretrained test

    def recording_extract(*args, **kwargs):
        extracted.append(extract_features(*args, **kwargs))
        return extracted[-1]

    monkeypatch.setattr(knn_module, "extract_features", recording_extract)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1"]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "demo.json").read_text())
    assert (out / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"
    model, obj = build_from_checkpoint(out / "last.pt")
    torch.manual_seed(obj["config"]["train"]["seed"])  # the initialisation the run started from
    untrained = create_model(**obj["model_config"])
    stats = obj["data_stats"]
    splits = [split_tensors("digits", s, stats["mean"], stats["std"], img_size=model.img_size) for s in ("train", "test")]
    assert len(extracted) == 4
    for i, (name, encoder, label) in enumerate((("untrained", untrained.encoder, "untrained network"),
                                                ("pretrained", model.encoder, "MAE pretrained"))):
        (bank, bank_y), (queries, query_y) = extracted[2 * i], extracted[2 * i + 1]
        for (images, labels), (feats, y) in zip(splits, extracted[2 * i: 2 * i + 2]):
            assert torch.equal(y, labels)
            assert torch.allclose(feats[:64], cls_features(encoder, images[:64]), atol=1e-4), name
        expected = numpy_weighted_knn(bank, bank_y, queries, query_y, 20, 0.07)
        assert report[f"knn_top1_k20_{name}"] == pytest.approx(expected), name
        printed = re.search(rf"{label}\s*:\s*([0-9.]+) %", text).group(1)
        assert printed == f"{expected:.2f}", name
    assert not torch.allclose(extracted[0][0][:64], extracted[2][0][:64], atol=1e-3)  # two different networks


def test_knn_label_fraction_and_output_dir(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    assert main(["knn", "--checkpoint", str(ckpt), "--data", str(data), "--k", "5", "--pool", "mean",
                 "--no-final-norm", "data.labels_per_class=7", f"output_dir={tmp_path}"]) == 0
    text = capsys.readouterr().out
    assert "14 of 546 images" in text and "14 train / 156 test" in text
    result = json.loads((tmp_path / "knn_metrics.json").read_text())
    assert result["labels_per_class"] == 7 and result["pool"] == "mean" and result["final_norm"] is False


def _extract_in_two_processes(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    enc, data = _tiny_encoder_and_data()
    feats, labels = extract_features(enc, data, batch_size=4)
    torch.save({"feats": feats, "labels": labels}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _tiny_encoder_and_data():
    torch.manual_seed(0)
    enc = MaskedViT(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    g = torch.Generator().manual_seed(1)
    return enc, torch.utils.data.TensorDataset(torch.randn(11, 1, 8, 8, generator=g), torch.arange(11))


def test_features_are_all_gathered_in_dataset_order(tmp_path):
    """Under DDP each rank encodes every other image; all ranks end with the single-process bank (odd size)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_extract_in_two_processes, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    enc, data = _tiny_encoder_and_data()
    ref, ref_labels = extract_features(enc, data, batch_size=4)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["labels"], ref_labels)
        assert torch.allclose(got["feats"], ref, atol=1e-5)
