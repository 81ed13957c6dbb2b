"""Figures: reconstructions (MAE, SimMIM, DDMIM), masks (DAMA, SimMIM, DDMIM), attention and rollout maps,
all saved through save_figure."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.backend_bases import FigureCanvasBase

from mimkit.config import check_output_file
from mimkit.errors import ConfigError


def check_figure_path(path: str | os.PathLike, what: str = "--out") -> None:
    """Refuse a figure path matplotlib cannot write (a folder, an unwritable place, an unknown suffix)."""
    check_output_file(path, what)
    suffix = Path(path).suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ConfigError(f"{what} {path} has no image suffix matplotlib can write: end it in .png, .pdf or .svg.")


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib figure to ``path`` atomically, close it, return the Path.

    The figure goes to a uniquely named temporary file beside ``path`` (two runs drawing the same
    figure cannot clobber each other's half-written file) and is renamed over ``path`` only when
    complete; on any failure the temporary file is removed, so no half-written PNG looks like a result.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # ".NAME.XXXX.tmp": the pattern a resumed run sweeps away when a kill left one behind
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return path
