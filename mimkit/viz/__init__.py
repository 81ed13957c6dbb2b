"""Figures: MAE reconstructions, DAMA masks, attention and rollout maps, all saved through save_figure."""


def save_figure(fig, path, dpi: int = 100):
    """Write a matplotlib figure to ``path`` atomically (temp file + rename), close it, return the Path.

    A run interrupted mid-write leaves no half-written PNG that looks like a result.
    """
    from pathlib import Path

    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    tmp.replace(path)
    return path
