"""Classification metrics as the papers and MedMNIST report them, written as JSON (+ a confusion-matrix PNG).

AUC follows MedMNIST's ``getAUC``: binary -> ROC AUC of the positive-class score; multi-class ->
mean of the one-vs-rest ROC AUCs over classes (classes absent from the test labels are skipped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from sklearn.metrics import roc_auc_score

from mimkit.checkpoint import write_text_atomic
from mimkit.viz import save_figure


def medmnist_auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """probs [N, C] (softmax, or any per-class increasing function of it such as log-softmax: AUC only
    ranks), labels [N] -> AUC in [0, 1] (nan when it is undefined)."""
    y = labels.cpu().numpy()
    p = probs.double().cpu().numpy()
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1])) if len(set(y.tolist())) == 2 else float("nan")
    aucs = [roc_auc_score(y == c, p[:, c]) for c in range(p.shape[1]) if 0 < (y == c).sum() < len(y)]
    return float(sum(aucs) / len(aucs)) if aucs else float("nan")


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """[N, C] logits -> [N, C] log(p_c / (1 - p_c)) in float64, an increasing function of each softmax
    probability that does not saturate: softmax itself rounds large margins to exactly 0 or 1, which
    ties the AUC ranking."""
    x = logits.double()
    classes = x.shape[1]
    others = x.unsqueeze(1).expand(-1, classes, -1).masked_fill(torch.eye(classes, dtype=torch.bool), float("-inf"))
    return x - others.logsumexp(dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor,
                           class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """logits [N, C], labels [N] -> top-1 % (top-5 % when C > 5), AUC, per-class accuracy %, confusion matrix.

    confusion[i][j] counts images of true class i predicted as j.
    """
    num_classes = logits.shape[1]
    labels = labels.long().cpu()
    logits = logits.float().cpu()
    pred = logits.argmax(dim=1)
    confusion = torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    per_class_total = confusion.sum(dim=1)
    per_class = (confusion.diag().float() / per_class_total.clamp(min=1) * 100).tolist()
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    out: dict[str, Any] = {
        "num_images": int(labels.numel()),
        "top1": float((pred == labels).float().mean() * 100),
        "auc": medmnist_auc(log_odds(logits), labels),
        "per_class_accuracy": {n: (a if t > 0 else None) for n, a, t in zip(names, per_class, per_class_total.tolist())},
        "class_names": names,
        "confusion_matrix": confusion.tolist(),
    }
    if num_classes > 5:
        top5 = logits.topk(5, dim=1).indices
        out["top5"] = float((top5 == labels[:, None]).any(dim=1).float().mean() * 100)
    return out


def save_confusion_matrix(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                          title: str = "") -> Path:
    """Row-normalised confusion matrix with counts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = torch.tensor(confusion, dtype=torch.float64)
    norm = cm / cm.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(class_names)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=[str(c)[:18] for c in class_names], rotation=45, ha="right")
    ax.set_yticks(range(n), labels=[str(c)[:18] for c in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def write_metrics(result: dict[str, Any], out_dir: str | Path, name: str) -> Path:
    """``out_dir/NAME.json`` plus ``out_dir/NAME_confusion.png`` when a confusion matrix is present."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = result.get("metrics", result)
    if "confusion_matrix" in metrics:
        png = save_confusion_matrix(metrics["confusion_matrix"], metrics["class_names"], out_dir / f"{name}_confusion.png",
                                    title=f"{name}: top-1 {metrics['top1']:.2f} %")
        result = {**result, "confusion_png": str(png)}
    path = out_dir / f"{name}.json"  # atomic: a killed run never leaves a half-written result
    return write_text_atomic(json.dumps(result, indent=2), path)
