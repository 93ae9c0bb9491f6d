"""load_dataset over folders, CSV manifests, .npz files, builtin:digits and keras: (offline),
and the identity rules of Dataset.digest and its file-digest memo."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurecache.data import Dataset, load_dataset
from featurecache.data.dataset import MEMO_FILENAME
from featurecache.errors import DatasetError, DatasetNotFoundError, DatasetWarning, ImageDecodeError, UsageError

PAST_NS = 1_600_000_000 * 10**9  # an mtime well outside the "racily recent" window


def _png(path: Path, seed: int, size: tuple[int, int] = (6, 5)) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _age(root: Path) -> None:
    """Give every file an old mtime so the digest memo may keep it."""
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(PAST_NS, PAST_NS))


@pytest.fixture()
def flat(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    _png(root / "dog" / "x.png", 1)
    _png(root / "cat" / "b.png", 2)
    _png(root / "cat" / "a.png", 3)
    _png(root / "cat" / "sub" / "c.png", 4)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / ".DS_Store").write_bytes(b"\0")
    (root / "README.md").write_text("about")
    return root


@pytest.fixture()
def nested(tmp_path: Path) -> Path:
    root = tmp_path / "split-data"
    seed = 100
    for split, n in (("train", 3), ("validation", 2), ("test", 2)):
        for cls in ("ant", "bee"):
            for i in range(n):
                seed += 1
                _png(root / split / cls / f"{i}.png", seed)
    _png(root / "test" / "cow" / "0.png", 99)  # a class only the test split has
    return root


# ------------------------------------------------------------------------------ folders


def test_folder_of_class_folders(flat: Path):
    ds = load_dataset(str(flat))
    assert isinstance(ds, Dataset) and ds.name == "pets" and ds.source == str(flat)
    assert ds.classes == ("cat", "dog") and list(ds.splits) == ["train"]
    train = ds.splits["train"]
    assert train.ids == ("cat/a.png", "cat/b.png", "cat/sub/c.png", "dog/x.png")
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [0, 0, 0, 1]
    assert len(train) == 4
    np.testing.assert_array_equal(train.load(3), np.asarray(Image.open(flat / "dog" / "x.png")))
    assert dict(ds.skipped) == {
        "README.md": "not inside a class folder",
        "cat/notes.txt": "not an image type (.txt)",
        "dog/.DS_Store": "hidden file",
    }


def test_folder_with_split_folders(nested: Path):
    ds = load_dataset(nested)
    assert ds.classes == ("ant", "bee", "cow")
    assert list(ds.splits) == ["train", "val", "test"]
    assert ds.splits["val"].ids == (
        "validation/ant/0.png",
        "validation/ant/1.png",
        "validation/bee/0.png",
        "validation/bee/1.png",
    )
    assert ds.splits["test"].labels.tolist() == [0, 0, 1, 1, 2]
    assert ds.splits["train"].labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_folder_mixing_split_and_class_folders_is_an_error(nested: Path):
    _png(nested / "cat" / "0.png", 5)
    with pytest.raises(DatasetError, match="mixes split folders"):
        load_dataset(nested)


def test_folder_without_images(tmp_path: Path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(tmp_path / "empty")


def test_loads_are_thread_safe_and_bad_images_raise(flat: Path):
    (flat / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    train = load_dataset(flat).splits["train"]
    assert "dog/broken.png" in train.ids
    good = [i for i, name in enumerate(train.ids) if name != "dog/broken.png"]
    sequential = [train.load(i) for i in good]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(train.load, good * 5))
    for j, img in enumerate(threaded):
        np.testing.assert_array_equal(img, sequential[j % len(good)])
    with pytest.raises(ImageDecodeError):
        train.load(train.ids.index("dog/broken.png"))


# ------------------------------------------------------------------------------ digest identity


def test_digest_ignores_location_but_sees_content_labels_names_and_splits(nested: Path, tmp_path: Path):
    original = load_dataset(nested).digest()
    assert len(original) == 64 and load_dataset(nested).digest() == original

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(nested, moved)
    assert load_dataset(moved).digest() == original  # new absolute paths and mtimes

    pixel = tmp_path / "pixel"
    shutil.copytree(nested, pixel)
    img = np.asarray(Image.open(pixel / "train" / "ant" / "0.png")).copy()
    img[0, 0, 0] ^= 1
    Image.fromarray(img).save(pixel / "train" / "ant" / "0.png")
    assert load_dataset(pixel).digest() != original

    renamed = tmp_path / "renamed"
    shutil.copytree(nested, renamed)
    (renamed / "train" / "ant" / "0.png").rename(renamed / "train" / "ant" / "9.png")
    assert load_dataset(renamed).digest() != original

    moved_split = tmp_path / "moved-split"
    shutil.copytree(nested, moved_split)
    (moved_split / "train" / "ant" / "0.png").rename(moved_split / "test" / "ant" / "0b.png")
    assert load_dataset(moved_split).digest() != original


def test_label_or_split_change_alone_changes_the_digest(tmp_path: Path):
    for name in ("a", "b", "c"):
        _png(tmp_path / "img" / f"{name}.png", ord(name))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\nimg/a.png,cat,train\nimg/b.png,dog,train\nimg/c.png,dog,test\n")
    before = load_dataset(manifest).digest()
    assert load_dataset(manifest).digest() == before
    manifest.write_text("path,label,split\nimg/a.png,cat,train\nimg/b.png,cat,train\nimg/c.png,dog,test\n")
    relabelled = load_dataset(manifest).digest()
    manifest.write_text("path,label,split\nimg/a.png,cat,train\nimg/b.png,dog,test\nimg/c.png,dog,test\n")
    moved = load_dataset(manifest).digest()
    assert len({before, relabelled, moved}) == 3


def test_digest_memo_is_used_when_size_and_mtime_match_and_refreshed_otherwise(flat: Path, tmp_path: Path):
    memo_dir = tmp_path / "cache"
    memo = memo_dir / MEMO_FILENAME
    fresh = load_dataset(flat, memo_dir=memo_dir)
    real = fresh.splits["train"].content_digests()
    # Files written a moment ago are hashed but not memoised (a same-size edit in the same
    # mtime tick could go unnoticed).
    assert not memo.exists() or not json.loads(memo.read_text())["files"]

    _age(flat)
    load_dataset(flat, memo_dir=memo_dir).digest()
    entries = json.loads(memo.read_text())["files"]
    target = str(flat / "cat" / "a.png")
    assert entries[target]["sha256"] == real[0] and len(entries) == 4
    assert not list(memo_dir.glob("*.tmp"))  # written via tmp + os.replace

    # Plant a wrong digest: if it comes back, the file was not re-read.
    entries[target]["sha256"] = "f" * 64
    memo.write_text(json.dumps({"format": 1, "files": entries}))
    assert load_dataset(flat, memo_dir=memo_dir).splits["train"].content_digests()[0] == "f" * 64

    # A changed mtime invalidates the entry: real hash again, memo refreshed.
    os.utime(flat / "cat" / "a.png", ns=(PAST_NS + 10**9, PAST_NS + 10**9))
    assert load_dataset(flat, memo_dir=memo_dir).splits["train"].content_digests()[0] == real[0]
    assert json.loads(memo.read_text())["files"][target]["sha256"] == real[0]

    memo.write_text("{ not json")  # a damaged memo is rebuilt, never trusted
    assert load_dataset(flat, memo_dir=memo_dir).digest() == fresh.digest()


# ------------------------------------------------------------------------------ CSV


def test_csv_manifest(tmp_path: Path):
    data = tmp_path / "data"
    _png(data / "img" / "a.png", 1)
    _png(data / "img" / "b.png", 2)
    _png(data / "img" / "c.png", 3)
    outside = tmp_path / "outside.png"
    _png(outside, 4)
    (data / "img" / "d.txt").write_text("x")
    manifest = data / "labels.csv"
    manifest.write_text(
        "Path,Label,Split\n"
        "img/b.png,zebra,train\n"
        "./img/a.png,ant,\n"
        f"{data / 'img' / 'c.png'},zebra,validation\n"
        f"{outside},ant,test\n"
        "img/d.txt,ant,train\n"
        "\n"
    )
    ds = load_dataset(manifest)
    assert ds.name == "labels" and ds.classes == ("ant", "zebra")
    assert list(ds.splits) == ["train", "val", "test"]
    assert ds.splits["train"].ids == ("img/b.png", "img/a.png")  # manifest order, normalised
    assert ds.splits["train"].labels.tolist() == [1, 0]
    assert ds.splits["val"].ids == ("img/c.png",)  # absolute path inside the CSV folder -> relative
    assert ds.splits["test"].ids == (outside.as_posix(),)
    assert ds.skipped == (("img/d.txt", "not an image type (.txt)"),)
    np.testing.assert_array_equal(ds.splits["train"].load(1), np.asarray(Image.open(data / "img" / "a.png")))


@pytest.mark.parametrize(
    "body,error,fragment",
    [
        ("img/a.png,cat\n", DatasetError, "header"),
        ("path,label\nimg/missing.png,cat\n", DatasetNotFoundError, "line 2"),
        ("path,label,split\nimg/a.png,cat,holdout\n", DatasetError, "'holdout'"),
        ("path,label\nimg/a.png,\n", DatasetError, "empty path or label"),
        ("path,label\nimg/a.png,cat\nimg/a.png,dog\n", DatasetError, "twice"),
    ],
)
def test_bad_csv_manifests(tmp_path: Path, body: str, error: type, fragment: str):
    _png(tmp_path / "img" / "a.png", 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text(body)
    with pytest.raises(error) as info:
        load_dataset(manifest)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------ npz


def test_npz_single_split_grey_with_numeric_labels(tmp_path: Path):
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", x=x, y=np.array([3, 7, 3, 7, 7]))
    ds = load_dataset(tmp_path / "tiny.npz")
    assert ds.name == "tiny" and ds.classes == ("3", "7") and list(ds.splits) == ["train"]
    train = ds.splits["train"]
    assert train.ids == ("0", "1", "2", "3", "4") and train.labels.tolist() == [0, 1, 0, 1, 1]
    np.testing.assert_array_equal(train.load(2), np.repeat(x[2][..., None], 3, axis=-1))


def test_npz_per_split_arrays_with_class_names(tmp_path: Path):
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (2, 3, 3, 1), dtype=np.uint8)
    path = tmp_path / "arr.npz"
    np.savez(
        path,
        x_train=x_train,
        y_train=np.array([[0], [1], [2], [1]]),
        x_test=x_test,
        y_test=np.array([2, 0]),
        classes=np.array(["red", "green", "blue"]),
    )
    ds = load_dataset(path)
    assert ds.classes == ("red", "green", "blue") and list(ds.splits) == ["train", "test"]
    assert ds.splits["train"].labels.tolist() == [0, 1, 2, 1]
    np.testing.assert_array_equal(ds.splits["test"].load(1), np.repeat(x_test[1], 3, axis=-1))
    before = ds.digest()

    x_train[2, 1, 1, 0] ^= 1
    np.savez(
        path,
        x_train=x_train,
        y_train=np.array([0, 1, 2, 1]),
        x_test=x_test,
        y_test=np.array([2, 0]),
        classes=np.array(["red", "green", "blue"]),
    )
    assert load_dataset(path).digest() != before


@pytest.mark.parametrize(
    "arrays,fragment",
    [
        ({"x": np.zeros((2, 3, 3), np.float32), "y": np.zeros(2, int)}, "uint8"),
        ({"x": np.zeros((2, 3, 3), np.uint8), "y": np.zeros(3, int)}, "one label per image"),
        ({"images": np.zeros((2, 3, 3), np.uint8)}, "expected x and y"),
        ({"x_train": np.zeros((2, 3, 3), np.uint8)}, "y_train"),
    ],
)
def test_bad_npz(tmp_path: Path, arrays: dict, fragment: str):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=fragment):
        load_dataset(tmp_path / "bad.npz")


# ------------------------------------------------------------------------------ builtin / keras / errors


def test_builtin_digits_is_deterministic_and_stratified():
    ds = load_dataset("builtin:digits")
    assert ds.name == "digits" and ds.classes == tuple(str(i) for i in range(10))
    sizes = {name: len(s) for name, s in ds.splits.items()}
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    ids = [set(s.ids) for s in ds.splits.values()]
    assert set.union(*ids) == {str(i) for i in range(1797)} and sum(map(len, ids)) == 1797
    for split in ds.splits.values():
        share = np.bincount(split.labels, minlength=10) / len(split)
        assert np.all(np.abs(share - 0.1) < 0.015), split.name
    img = ds.splits["train"].load(0)
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3)
    allowed = set(np.rint(np.arange(17) * 255 / 16).astype(int).tolist())
    assert set(np.unique(img).tolist()) <= allowed
    again = load_dataset("builtin:digits")
    assert again.splits["val"].ids == ds.splits["val"].ids and again.digest() == ds.digest()


def test_limit_is_stratified_deterministic_and_keeps_order(nested: Path):
    ds = load_dataset("builtin:digits", limit=30)
    for split in ds.splits.values():
        assert len(split) == 30
        assert np.bincount(split.labels, minlength=10).tolist() == [3] * 10
        assert [int(i) for i in split.ids] == sorted(int(i) for i in split.ids)  # original order kept
    again = load_dataset("builtin:digits", limit=30)
    assert again.digest() == ds.digest()
    assert load_dataset("builtin:digits", limit=30, seed=1).splits["train"].ids != ds.splits["train"].ids

    small = load_dataset(nested, limit=2)
    assert [len(s) for s in small.splits.values()] == [2, 2, 2]
    assert small.splits["train"].labels.tolist() == [0, 1]  # one ant, one bee
    full = load_dataset(nested)
    positions = [full.splits["train"].ids.index(i) for i in small.splits["train"].ids]
    assert positions == sorted(positions)


def test_val_fraction_carves_a_stratified_val_split(flat: Path, tmp_path: Path):
    x = np.zeros((20, 2, 2), np.uint8) + np.arange(20, dtype=np.uint8)[:, None, None]
    np.savez(tmp_path / "v.npz", x=x, y=np.repeat([0, 1], 10))
    ds = load_dataset(tmp_path / "v.npz", val_fraction=0.2)
    assert [len(s) for s in ds.splits.values()] == [16, 4]
    assert np.bincount(ds.splits["val"].labels).tolist() == [2, 2]
    assert not set(ds.splits["val"].ids) & set(ds.splits["train"].ids)
    assert load_dataset(tmp_path / "v.npz", val_fraction=0.2).digest() == ds.digest()


def test_keras_dataset_offline_gives_one_line_with_the_fix():
    with pytest.raises(DatasetError) as info:
        load_dataset("keras:cifar10")
    message = str(info.value)
    assert "\n" not in message
    assert "cifar-10-python.tar.gz" in message and ".npz" in message and "internet" in message


@pytest.mark.parametrize(
    "source,error,fragment",
    [
        ("hf:beans", DatasetError, "unknown dataset scheme 'hf'"),
        ("keras:imagenet", DatasetError, "'cifar10'"),
        ("builtin:iris", DatasetError, "'digits'"),
        ("/no/such/folder", DatasetNotFoundError, "not found"),
    ],
)
def test_unknown_sources_list_the_accepted_forms(source: str, error: type, fragment: str):
    with pytest.raises(error) as info:
        load_dataset(source)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    if error is DatasetNotFoundError:
        assert isinstance(info.value, FileNotFoundError) and "builtin:digits" in str(info.value)


def test_bad_options():
    with pytest.raises(UsageError, match="limit"):
        load_dataset("builtin:digits", limit=0)
    with pytest.raises(UsageError, match="val_fraction"):
        load_dataset("builtin:digits", val_fraction=1.5)


def test_unreadable_file_gets_a_deterministic_identity_instead_of_stopping(tmp_path: Path) -> None:
    # open() fails on a directory as it does on a file without read permission (which root,
    # running CI, cannot simulate): the run goes on and extraction marks the image invalid.
    from featurecache.data.dataset import file_digests

    target = tmp_path / "looks_like.png"
    target.mkdir()
    memo = tmp_path / "memo.json"
    assert file_digests([target], memo_path=memo) == ["unreadable:EISDIR"]
    assert file_digests([target], memo_path=memo) == ["unreadable:EISDIR"]  # never memoised as content
    assert not memo.exists()


def test_all_file_splits_are_digested_in_one_memo_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from featurecache.data import dataset as dataset_mod
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "imgs", splits=("train", "val", "test"), per_class=3)
    calls: list[int] = []
    real = dataset_mod.file_digests

    def counting(paths, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(paths))
        return real(paths, **kw)

    monkeypatch.setattr(dataset_mod, "file_digests", counting)
    ds = load_dataset(str(root), memo_dir=tmp_path / "memo")
    digest = ds.digest()
    assert calls == [18]  # one pass (one memo read and write) for 3 splits x 6 files
    for split in ds.splits.values():
        assert split.content_digests() == real(split.items.paths)  # each split got its own digests
    assert load_dataset(str(root)).digest() == digest  # same as digesting split by split without a memo


def test_array_digests_hash_dtype_shape_header_then_pixels() -> None:
    import hashlib

    from featurecache.data.dataset import ArrayItems

    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3, 3), dtype=np.uint8)
    header = json.dumps({"dtype": "|u1", "shape": [4, 3, 3]}, sort_keys=True).encode()
    expected = [hashlib.sha256(header + img.tobytes()).hexdigest() for img in images]
    assert ArrayItems(images).content_digests() == expected
    assert ArrayItems(images[:0]).content_digests() == []


# ---------------------------------------------------------------------------------- symbolic links


def _two_classes(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    _png(root / "a" / "a1.png", 1)
    _png(root / "b" / "b1.png", 2)
    _png(root / "b" / "b2.png", 3)
    return root


def test_folder_link_up_to_the_dataset_root_is_refused(tmp_path: Path) -> None:
    # It used to add class b's images again, labelled a.
    root = _two_classes(tmp_path)
    (root / "a" / "up").symlink_to("..")
    with pytest.raises(
        DatasetError, match=r"link 'a/up' -> '\.\.' points to a folder that contains it.*remove the link"
    ) as info:
        load_dataset(str(root))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("target", [".", "..", "../..", "../../.."])
def test_folder_links_that_loop_or_leave_are_refused_naming_the_link(tmp_path: Path, target: str) -> None:
    root = _two_classes(tmp_path)
    (root / "a" / "sub").mkdir()
    (root / "a" / "sub" / "loop").symlink_to(target)
    with pytest.raises(DatasetError, match=r"link 'a/sub/loop'"):
        load_dataset(str(root))


def test_link_loop_of_links_is_refused_not_called_a_non_image(tmp_path: Path) -> None:
    root = _two_classes(tmp_path)
    (root / "a" / "x.png").symlink_to("y.png")
    (root / "a" / "y.png").symlink_to("x.png")
    with pytest.raises(DatasetError, match=r"link 'a/x.png' -> 'y.png' is a loop of links"):
        load_dataset(str(root))


def test_links_out_of_the_dataset_folder_are_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    _png(elsewhere / "c1.png", 9)
    root = _two_classes(tmp_path)
    (root / "c").symlink_to(elsewhere)  # a class folder
    with pytest.raises(
        DatasetError, match=rf"link 'c' points outside the dataset folder, to {elsewhere}; .*CSV manifest"
    ):
        load_dataset(str(root))
    (root / "c").unlink()
    (root / "a" / "c1.png").symlink_to(elsewhere / "c1.png")  # one file
    with pytest.raises(DatasetError, match=r"link 'a/c1.png' points outside"):
        load_dataset(str(root))


def test_links_inside_the_dataset_are_followed(tmp_path: Path) -> None:
    root = _two_classes(tmp_path)
    (root / "b" / "more").mkdir()
    _png(root / "b" / "more" / "b3.png", 4)
    (root / "b" / "again").symlink_to("more")  # a sibling folder: same label
    (root / "b" / "b1-copy.png").symlink_to("b1.png")
    ds = load_dataset(str(root))
    assert ds.splits["train"].ids == (
        "a/a1.png",
        "b/again/b3.png",
        "b/b1-copy.png",
        "b/b1.png",
        "b/b2.png",
        "b/more/b3.png",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # duplicates under one label are not a warning
        ds.digest()


def test_same_image_under_two_labels_is_a_warning_naming_the_ids(tmp_path: Path) -> None:
    root = _two_classes(tmp_path)
    (root / "a" / "b1-link.png").symlink_to("../b/b1.png")
    shutil.copy(root / "b" / "b2.png", root / "a" / "b2-copy.png")
    with pytest.warns(DatasetWarning) as record:
        digest = load_dataset(str(root)).digest()
    assert len(record) == 1
    message = str(record[0].message)
    assert "2 image(s) appear under two labels" in message
    assert "train/a/b1-link.png ('a') = train/b/b1.png ('b')" in message
    assert "train/a/b2-copy.png ('a') = train/b/b2.png ('b')" in message
    assert len(digest) == 64  # a warning, not an error: the dataset still loads


def test_the_label_warning_names_split_folder_ids_once(tmp_path: Path) -> None:
    # Ids in split folders start with the folder ("val/b/b1.png"): the split is not prefixed again.
    root = tmp_path / "pets"
    _png(root / "train" / "a" / "a1.png", 1)
    _png(root / "val" / "b" / "b1.png", 2)
    shutil.copy(root / "val" / "b" / "b1.png", root / "train" / "a" / "b1-copy.png")
    with pytest.warns(DatasetWarning) as record:
        load_dataset(str(root)).digest()
    message = str(record[0].message)
    assert "train/a/b1-copy.png ('a') = val/b/b1.png ('b')" in message, message
    assert "train/train/" not in message and "val/val/" not in message
