"""Folder indexing for lazy datasets: layout rules, the cache and its invalidation, roots, subsets."""

import os
import time

import numpy as np
import pytest

from mimkit.data import folder_index as fi
from mimkit.errors import DataError


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _make_tree(root, layout):
    for rel in layout:
        _touch(root / rel)


def test_imagefolder_splits_share_class_indices_and_files_are_sorted(tmp_path):
    _make_tree(tmp_path, ["train/dog/b.png", "train/dog/a.jpg", "train/cat/z.tif", "val/emu/1.png",
                          "train/dog/notes.txt", "train/.hidden/x.png"])
    train = fi.index_folder(tmp_path, "train")
    assert [os.path.relpath(f, tmp_path) for f in train.files] == ["train/cat/z.tif", "train/dog/a.jpg",
                                                                   "train/dog/b.png"]
    assert train.class_names == ["cat", "dog", "emu"]  # union over splits: indices agree with val
    assert train.labels.tolist() == [0, 1, 1]
    assert fi.index_folder(tmp_path, "val").labels.tolist() == [2]
    with pytest.raises(DataError, match="choose one of train, val"):
        fi.index_folder(tmp_path, "test")


def test_flat_or_nested_folders_are_unlabeled(tmp_path):
    _make_tree(tmp_path, ["a.png", "sub/b.png"])
    ix = fi.index_folder(tmp_path)
    assert ix.class_names == [] and ix.labels.tolist() == [-1, -1]
    with pytest.raises(DataError, match="only split 'train' exists"):
        fi.index_folder(tmp_path, "val")


def test_cache_is_used_and_invalidated_when_a_file_is_added_or_removed(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    _make_tree(data, ["c0/a.png", "c0/b.png", "c1/c.png"])
    assert len(fi.index_folder(data, cache=cache)) == 3
    (cache_file,) = cache.iterdir()

    walks = []
    real_walk = fi._walk
    monkeypatch.setattr(fi, "_walk", lambda top: walks.append(top) or real_walk(top))
    assert len(fi.index_folder(data, cache=cache)) == 3
    assert walks == []  # fresh cache: no rescan

    time.sleep(0.01)  # mtime_ns granularity
    _touch(data / "c1" / "d.png")
    ix = fi.index_folder(data, cache=cache)
    assert [os.path.basename(f) for f in ix.files] == ["a.png", "b.png", "c.png", "d.png"] and len(walks) == 1
    os.remove(data / "c0" / "a.png")
    assert len(fi.index_folder(data, cache=cache)) == 3 and len(walks) == 2

    cache_file.write_text("not json\n")  # a damaged cache is rebuilt, not trusted
    assert len(fi.index_folder(data, cache=cache)) == 3 and len(walks) == 3


def test_many_classes_are_labelled_in_sorted_order(tmp_path):
    root = tmp_path / "big"
    for c in range(30):
        d = root / f"n{c:03d}"
        d.mkdir(parents=True)
        for i in range(40):
            open(d / f"{i:05d}.jpg", "wb").close()
    ix = fi.index_folder(root)  # the scan's speed is measured in benchmarks/data_throughput.py
    assert len(ix) == 1200 and ix.labels.tolist() == [c for c in range(30) for _ in range(40)]
    assert ix.files[41] == str(root.resolve() / "n001" / "00001.jpg")


def test_roots_merge_class_names_by_name(tmp_path):
    _make_tree(tmp_path / "a", ["x/1.png", "y/2.png"])
    _make_tree(tmp_path / "b", ["y/3.png", "z/4.png"])
    merged = fi.merge_indices([fi.index_folder(tmp_path / "a"), fi.index_folder(tmp_path / "b")])
    assert merged.class_names == ["x", "y", "z"]
    assert [os.path.basename(f) for f in merged.files] == ["1.png", "2.png", "3.png", "4.png"]
    assert merged.labels.tolist() == [0, 1, 1, 2]
    _make_tree(tmp_path / "flat", ["5.png"])
    with pytest.raises(DataError, match="no class sub-folders"):
        fi.merge_indices([fi.index_folder(tmp_path / "a"), fi.index_folder(tmp_path / "flat")])


def test_first_per_class_takes_exactly_the_first_fraction_in_sorted_order(tmp_path):
    _make_tree(tmp_path, [f"c0/{i:02d}.png" for i in range(10)] + [f"c1/{i:02d}.png" for i in range(7)]
               + [f"c2/{i:02d}.png" for i in range(3)])
    sub = fi.first_per_class(fi.index_folder(tmp_path), 0.2)
    names = [os.path.relpath(f, tmp_path) for f in sub.files]
    # ceil(0.2 n): 2 of 10, 2 of 7 (1.4 -> 2), 1 of 3 (0.6 -> 1)
    assert names == ["c0/00.png", "c0/01.png", "c1/00.png", "c1/01.png", "c2/00.png"]
    assert sub.labels.tolist() == [0, 0, 1, 1, 2]


def test_random_fraction_is_seeded_and_file_list_keeps_its_order(tmp_path):
    _make_tree(tmp_path, [f"{i:03d}.png" for i in range(50)])
    ix = fi.index_folder(tmp_path)
    a, b = fi.random_fraction(ix, 0.3, seed=1), fi.random_fraction(ix, 0.3, seed=1)
    assert a.files == b.files and len(a) == 15 and a.files == sorted(a.files)
    assert fi.random_fraction(ix, 0.3, seed=2).files != a.files
    listing = tmp_path / "list.txt"
    listing.write_text(f"# chosen\n007.png\n{tmp_path / '003.png'}\n\n")
    assert [os.path.basename(f) for f in fi.from_file_list(ix, listing).files] == ["007.png", "003.png"]
    listing.write_text("missing.png\n")
    with pytest.raises(DataError, match="not images of"):
        fi.from_file_list(ix, listing)


def test_labels_are_int64_and_select_keeps_classes(tmp_path):
    _make_tree(tmp_path, ["a/1.png", "b/2.png"])
    ix = fi.index_folder(tmp_path)
    assert ix.labels.dtype == np.int64
    assert ix.select([1]).class_names == ["a", "b"] and ix.select([1]).labels.tolist() == [1]


def test_file_order_is_a_sorted_os_walk(tmp_path):
    """The in-memory loader's order (top-level files before sub-folders, '-' names after their prefix)."""
    _make_tree(tmp_path, ["z.png", "a.png", "sub/b.png", "n1/x.png", "n1-2/x.png", "n1/deep/y.png"])
    walked = []
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        dirnames.sort()
        walked += [os.path.relpath(os.path.join(dirpath, f), tmp_path) for f in sorted(filenames)]
    assert [os.path.relpath(f, tmp_path) for f in fi.index_folder(tmp_path).files] == walked
    assert walked[:2] == ["a.png", "z.png"]  # a plain string sort would put sub/ between them


def test_path_table_gives_back_every_path_including_non_ascii_ones():
    from mimkit.data.folder_index import PathTable

    paths = ["/data/a/0.jpg", "/data/ä/ünïcode.png", "", "/x/" + "y" * 300 + ".tif"]
    table = PathTable(paths)
    assert len(table) == 4 and list(table) == paths and table == paths and table != paths[:3]
    assert table[-1] == paths[-1] and table[1:3] == paths[1:3] and table.index(paths[1]) == 1
    assert table[np.int64(1)] == paths[1]
    with pytest.raises(IndexError):
        table[4]
    # two arrays, no Python object per path: what forked workers read stays shared
    assert {type(v) for v in vars(table).values()} == {np.ndarray}
