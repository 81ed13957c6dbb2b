"""Image files that could not be decoded during a run (``data.on_error=skip``): counted, reported,
and a stop once there are too many.

A skipped file is replaced by another image (:meth:`mimkit.data.lazy.LazyImageDataset.readable`),
so one broken JPEG in a million costs nothing. Many failures mean something else (a mount went
away, a disk is failing, the wrong folder): then a run must stop early with a clear error rather
than train ten hours on the few files it can still read. The default cap, 0.1 % of the files in
an epoch, tolerates the handful of broken files real collections have (ImageNet-1k: a few out of
1.28 M) and stops within the first minutes of a systematic failure.
"""

from __future__ import annotations

from typing import Iterable

from mimkit.errors import DataError

_SHOWN = 5  # paths named in reports


class UnreadableFiles:
    """Failures of the current epoch, plus files already dropped when the data was loaded.

    num_files: files of the split (readable or not); max_fraction: ``data.max_bad_fraction``;
    at_load: files left out while loading into memory (they count in every epoch).
    """

    def __init__(self, num_files: int, max_fraction: float, at_load: Iterable[str] = ()):
        self.num_files, self.max_fraction = max(1, num_files), max_fraction
        self.at_load = list(at_load)
        self.start_epoch()

    def start_epoch(self) -> None:
        self.epoch_paths: list[str] = []
        self._seen: set[str] = set()

    def add(self, failed: Iterable[str]) -> None:
        """A batch's ``failed_paths`` strings (one per sample, paths separated by newlines, "" = none)."""
        for text in failed:
            for path in text.split("\n") if text else ():
                if path not in self._seen:
                    self._seen.add(path)
                    self.epoch_paths.append(path)

    def local_count(self) -> int:
        """This process's failures this epoch (processes read disjoint samples: their sum is the epoch's)."""
        return len(self.epoch_paths)

    def check(self, epoch_count: int, epoch: int | None) -> None:
        """DataError once ``epoch_count`` (all processes) plus the files dropped at load exceed the
        cap; ``epoch`` None = while loading."""
        total = epoch_count + len(self.at_load)
        if total > self.max_fraction * self.num_files:
            first = (self.at_load + self.epoch_paths)[:_SHOWN]
            raise DataError(
                f"{total} of {self.num_files} image files ({100 * total / self.num_files:.2g} %) could not be read "
                f"{'while loading' if epoch is None else f'by epoch {epoch + 1}'}, more than data.max_bad_fraction={self.max_fraction:g} (first: "
                f"{', '.join(first)}): check the data, or raise data.max_bad_fraction to train on what can be read.")

    def report(self, epoch_count: int) -> dict:
        """``{"count", "fraction", "first"}`` for the epoch record and summary.json."""
        total = epoch_count + len(self.at_load)
        return {"count": total, "fraction": total / self.num_files, "first": (self.at_load + self.epoch_paths)[:_SHOWN]}
