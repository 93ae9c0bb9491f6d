"""Dataset sources: turn a source string into a :class:`~featurecache.data.Dataset`.

Accepted forms (see :data:`ACCEPTED_FORMS`): a folder of class sub-folders, optionally inside
``train/ val/ test/``; a CSV manifest; an ``.npz`` of arrays; ``keras:<name>`` for
``keras.datasets``; ``builtin:digits`` (scikit-learn's 8x8 digits, the offline default).

Everything here is deterministic: files are sorted, subsets and carved validation splits are
drawn from ``np.random.default_rng([seed, purpose, split])`` and keep the original order, so
the same source and options always give the same manifest digest.
"""

from __future__ import annotations

import csv
import errno
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from featurecache.data.dataset import MEMO_FILENAME, SPLIT_NAMES, ArrayItems, Dataset, FileItems, JoinedPaths, Split
from featurecache.data.decode import IMAGE_EXTENSIONS
from featurecache.errors import DatasetError, DatasetNotFoundError, FeatureCacheError, UsageError, choices

__all__ = ["ACCEPTED_FORMS", "BUILTIN_DATASETS", "KERAS_DATASETS", "image_files", "load_dataset", "stratified_choice"]

ACCEPTED_FORMS = (
    "accepted forms: a folder of class sub-folders (optionally inside train/ val/ test/), "
    "a .csv manifest with header path,label[,split], an .npz with x,y or x_train,y_train[,x_val,y_val][,x_test,y_test], "
    "'keras:cifar10', 'keras:cifar100', 'keras:mnist', 'keras:fashion_mnist', 'builtin:digits'"
)

_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_PURPOSE_LIMIT, _PURPOSE_VAL = 0, 1  # separate random streams for `limit` and `val_fraction`

_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# CIFAR-100 fine labels are numbered in the alphabetical order of their names.
_CIFAR100 = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
    flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree
    motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate
    poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
    squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
    wardrobe whale willow_tree wolf woman worm""".split()
)

#: ``keras:<name>`` datasets -> (download URL, class names).
KERAS_DATASETS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", _CIFAR10),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", _CIFAR100),
    "mnist": (
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz",
        tuple(str(i) for i in range(10)),
    ),
    "fashion_mnist": (
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/train-labels-idx1-ubyte.gz",
        _FASHION,
    ),
}
#: ``builtin:<name>`` datasets, available offline.
BUILTIN_DATASETS: tuple[str, ...] = ("digits",)
_DIGITS_SPLIT_SEED = 20240601  # fixed: builtin:digits must be the same dataset everywhere
_DIGITS_FRACTIONS = (0.70, 0.15, 0.15)


def load_dataset(
    source: str | os.PathLike[str],
    *,
    memo_dir: Path | None = None,
    limit: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a dataset from a folder, CSV, ``.npz``, ``keras:<name>`` or ``builtin:digits``.

    Parameters
    ----------
    source
        A folder of class sub-folders (class names are the sorted sub-folder names; optional
        ``train/ val/ test/`` split folders, ``validation/`` counts as ``val``); a CSV manifest
        with a header row ``path,label[,split]`` (paths relative to the CSV's folder or
        absolute, split defaults to ``train``); an ``.npz`` with ``x``/``y`` or
        ``x_train``/``y_train`` (and optional ``_val``/``_test``) and an optional ``classes``
        array; ``keras:cifar10|cifar100|mnist|fashion_mnist``; or ``builtin:digits``.
    memo_dir
        Folder of the file-digest memo (``file-digests.json``), so a re-run does not re-read
        unchanged files; ``None`` hashes every file each time.
    limit
        Keep at most this many items per split: a stratified subset drawn from ``seed``, in
        the original order.
    val_fraction
        If the source has no validation split, move this stratified fraction of ``train`` to
        ``val`` (drawn from ``seed``). Ignored when the source defines a validation split.
    seed
        Seed of ``limit`` and ``val_fraction`` draws (not of ``builtin:digits``' fixed split).

    Returns
    -------
    Dataset

    Raises
    ------
    DatasetNotFoundError
        The path does not exist, or files a CSV lists are missing.
    DatasetError
        Unknown scheme or name, a malformed source, no images, or a ``keras:`` dataset that
        cannot be downloaded (offline).
    UsageError
        Bad ``limit``, ``val_fraction`` or ``seed``.
    """
    if isinstance(limit, bool) or (limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1)):
        raise UsageError(f"limit must be a positive int or None, got {limit!r}; pass e.g. --limit 100")
    if val_fraction is not None and (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float, np.integer, np.floating))
        or not 0.0 < float(val_fraction) < 1.0
    ):
        raise UsageError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}; pass e.g. 0.1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(source, (str, os.PathLike)):
        raise DatasetError(f"dataset source must be a string, got {type(source).__name__}; {ACCEPTED_FORMS}")
    text = os.fspath(source)
    memo_path = Path(memo_dir) / MEMO_FILENAME if memo_dir is not None else None
    dataset = _resolve(text, memo_path)
    splits = dict(dataset.splits)
    changed = False
    if val_fraction is not None and "val" not in splits:
        splits, changed = _carve_val(splits, float(val_fraction), int(seed), text), True
    if limit is not None:
        for name, split in splits.items():
            rng = np.random.default_rng([int(seed), _PURPOSE_LIMIT, _SPLIT_CODE[name]])
            keep = stratified_choice(split.labels, k=int(limit), rng=rng, min_per_class=1)
            if len(keep) < len(split):
                splits[name], changed = split.subset(keep), True
    if not changed:
        return dataset
    return Dataset(dataset.name, dataset.source, dataset.classes, splits, dataset.skipped)


def stratified_choice(labels: np.ndarray, *, k: int, rng: np.random.Generator, min_per_class: int = 0) -> np.ndarray:
    """Sorted positions of ``k`` items drawn without replacement, keeping class proportions.

    Class quotas use the largest-remainder method in exact integers (ties go to the class
    that comes first), after giving each class ``min_per_class`` items when ``k`` allows.

    Parameters
    ----------
    labels
        ``(n,)`` class labels.
    k
        How many to keep; ``k >= n`` keeps everything.
    rng
        Generator the members of each class are drawn from, class by class.
    min_per_class
        Items every class gets first, if ``k`` is at least that times the number of classes.

    Returns
    -------
    numpy.ndarray
        ``int64`` positions, ascending.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    base = (
        np.minimum(counts, min_per_class)
        if min_per_class and k >= min_per_class * len(counts)
        else np.zeros_like(counts)
    )
    avail = counts - base
    remaining = k - int(base.sum())
    numer = avail * remaining
    total = int(avail.sum())
    quota = numer // total if total else np.zeros_like(avail)
    frac = numer % total if total else np.zeros_like(avail)
    short = remaining - int(quota.sum())
    order = np.lexsort((np.arange(len(counts)), -frac))
    quota[order[:short]] += 1
    quota = base + quota
    picked = [rng.choice(np.flatnonzero(inverse == c), size=int(q), replace=False) for c, q in enumerate(quota)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _carve_val(splits: dict[str, Split], fraction: float, seed: int, text: str) -> dict[str, Split]:
    if "train" not in splits:
        raise DatasetError(f"dataset {text!r} has no train split to carve a validation split from; drop val_fraction")
    train = splits["train"]
    n_val = min(len(train) - 1, max(1, round(len(train) * fraction)))
    if n_val < 1:
        raise DatasetError(
            f"dataset {text!r} has {len(train)} training items, too few to carve a validation split; drop val_fraction"
        )
    rng = np.random.default_rng([seed, _PURPOSE_VAL, _SPLIT_CODE["val"]])
    val_idx = stratified_choice(train.labels, k=n_val, rng=rng)
    train_idx = np.setdiff1d(np.arange(len(train)), val_idx)
    out = {"train": train.subset(train_idx), "val": train.subset(val_idx).renamed("val")}
    if "test" in splits:
        out["test"] = splits["test"]
    return out


def _resolve(text: str, memo_path: Path | None) -> Dataset:
    try:
        return _resolve_source(text, memo_path)
    except FeatureCacheError:
        raise
    except OSError as exc:  # an unreadable folder or file met while listing the dataset
        raise DatasetError(f"cannot read dataset {text!r}: {exc}; check its permissions") from exc


def _resolve_source(text: str, memo_path: Path | None) -> Dataset:
    path = Path(text).expanduser()
    if text and path.exists():
        if path.is_dir():
            return _from_folder(path, text, memo_path)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return _from_csv(path, text, memo_path)
        if suffix == ".npz":
            return _from_npz(path, text)
        raise DatasetError(
            f"dataset file {text!r} has unsupported type {suffix or '(no extension)'!r}; {ACCEPTED_FORMS}"
        )
    # Two or more letters before ':' so a Windows drive ("C:\\data") is never taken for a scheme.
    match = re.fullmatch(r"([A-Za-z][A-Za-z0-9_+.-]+):(.*)", text)
    if match:
        scheme, name = match.group(1).lower(), match.group(2).strip().lower()
        if scheme == "keras":
            return _from_keras(name, text)
        if scheme == "builtin":
            return _from_builtin(name, text)
        raise DatasetError(f"unknown dataset scheme {scheme!r} in {text!r}; {ACCEPTED_FORMS}")
    raise DatasetNotFoundError(
        f"dataset {text!r} not found: no such file or folder ({path.absolute()}); {ACCEPTED_FORMS}"
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "data"


# ---------------------------------------------------------------------------------- folders


def _from_folder(root: Path, text: str, memo_path: Path | None) -> Dataset:
    root = root.resolve()
    top = (str(root),)  # real paths of the folders a link must not lead back into
    skipped: list[tuple[str, str]] = []
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    split_dirs: dict[str, str] = {}
    others: list[str] = []
    for entry in entries:
        if entry.name.startswith("."):
            skipped.append((entry.name, "hidden folder" if entry.is_dir() else "hidden file"))
            continue
        _check_link(entry.path, entry.name, top, text)
        if entry.is_dir():
            split = _SPLIT_ALIASES.get(entry.name.lower())
            if split is None:
                others.append(entry.name)
            elif split in split_dirs:
                raise DatasetError(
                    f"dataset folder {text!r} has two folders for split {split!r}: {split_dirs[split]!r} and {entry.name!r}; keep one"
                )
            else:
                split_dirs[split] = entry.name
    if split_dirs and others:
        raise DatasetError(
            f"dataset folder {text!r} mixes split folders ({', '.join(split_dirs.values())}) with other folders "
            f"({', '.join(repr(o) for o in others[:5])}); put every class folder inside train/ val/ test/, or use no split folders"
        )
    layout = {s: split_dirs[s] for s in SPLIT_NAMES if s in split_dirs} if split_dirs else {"train": ""}
    for entry in entries:
        if not entry.name.startswith(".") and not entry.is_dir():
            where = "a split folder" if split_dirs else "a class folder"
            skipped.append((entry.name, f"not inside {where}"))
    found: dict[str, list[tuple[str, str, str]]] = {}  # split -> [(class, rel id, abs path)]
    class_names: set[str] = set()
    for split, sub in layout.items():
        base = root / sub if sub else root
        chain = (*top, os.path.realpath(base)) if sub else top
        items: list[tuple[str, str, str]] = []
        for entry in sorted(os.scandir(base), key=lambda e: e.name):
            rel = f"{sub}/{entry.name}" if sub else entry.name
            if entry.name.startswith("."):
                if sub:
                    skipped.append((rel, "hidden folder" if entry.is_dir() else "hidden file"))
                continue
            _check_link(entry.path, rel, chain, text)
            if entry.is_dir():
                class_names.add(entry.name)
                for rel_file, path in _walk_files(Path(entry.path), rel, skipped, chain, text):
                    items.append((entry.name, rel_file, path))
            elif sub:
                skipped.append((rel, "not inside a class folder"))
        found[split] = items
    classes = tuple(sorted(class_names))
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, Split] = {}
    for split, items in found.items():
        if not items:
            if layout[split]:
                skipped.append((layout[split], "split folder has no images"))
            continue
        items.sort(key=lambda t: (index[t[0]], t[1]))
        ids = tuple(rel for _, rel, _ in items)
        splits[split] = Split(
            split,
            ids,
            np.array([index[c] for c, _, _ in items], dtype=np.int64),
            # The ids are the paths relative to the folder: no second string per file (issue 12).
            FileItems(JoinedPaths.of([p for _, _, p in items], top[0] + os.sep, ids), memo_path),
        )
    if not splits:
        raise DatasetError(
            f"no images found in dataset folder {text!r}: expected one sub-folder per class holding "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))} files (optionally inside train/ val/ test/); {len(skipped)} files were skipped"
        )
    skipped.sort()
    return Dataset(_slug(root.name), text, classes, splits, tuple(skipped))


def _check_link(path: str, rel: str, chain: tuple[str, ...], text: str) -> None:
    """Refuse a symbolic link that leaves the dataset folder or leads back into a folder holding it.

    ``chain`` holds the real paths of the dataset folder (first) and of every folder between it
    and ``path``. A link out of the dataset would make its digest depend on files the user did
    not name; a link up (``a/up -> ..``) would add other classes' images again under this label,
    or loop. Links within the dataset are followed; dangling links are skipped later.

    Raises
    ------
    DatasetError
        Naming the link, where it points and the fix.
    """
    if not os.path.islink(path):
        return
    try:
        real = os.path.realpath(path, strict=True)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            return  # dangling: skipped (and reported) as a broken link
        raise DatasetError(
            f"dataset folder {text!r}: link {rel!r} -> {os.readlink(path)!r} is a loop of links that never reaches a file; remove it"
        ) from None
    root = chain[0]
    if os.path.commonpath([root, real]) != root:
        raise DatasetError(
            f"dataset folder {text!r}: link {rel!r} points outside the dataset folder, to {real}; copy those files in, "
            "or list every image in a CSV manifest (path,label), whose paths may lead anywhere"
        )
    if real in chain:
        raise DatasetError(
            f"dataset folder {text!r}: link {rel!r} -> {os.readlink(path)!r} points to a folder that contains it, "
            "so it would list images again under another label or loop forever; remove the link"
        )


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, in name order, walked as a dataset folder is
    (hidden entries and other file types skipped, links checked)."""
    return [Path(path) for _, path in _walk_files(folder, folder.name, [], (), str(folder))]


def _walk_files(
    folder: Path, rel: str, skipped: list[tuple[str, str]], chain: tuple[str, ...], text: str
) -> list[tuple[str, str]]:
    """Image files under ``folder`` (recursively, following links that stay inside the dataset)."""
    out: list[tuple[str, str]] = []

    def visit(path: Path, rel_dir: str, chain: tuple[str, ...]) -> None:
        chain = (*chain, os.path.realpath(path))
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            rel_path = f"{rel_dir}/{entry.name}"
            if entry.name.startswith("."):
                skipped.append((rel_path, "hidden folder" if entry.is_dir() else "hidden file"))
                continue
            if entry.is_symlink():  # from the directory listing: no system call per plain file
                _check_link(entry.path, rel_path, chain, text)
            if entry.is_dir():
                visit(Path(entry.path), rel_path, chain)
            elif not entry.is_file():
                skipped.append((rel_path, "not a regular file (broken link?)"))
            elif os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                ext = os.path.splitext(entry.name)[1] or "no extension"
                skipped.append((rel_path, f"not an image type ({ext})"))
            else:
                out.append((rel_path, entry.path))

    visit(folder, rel, chain)
    return out


# ---------------------------------------------------------------------------------- CSV


def _read_manifest(path: Path, text: str) -> tuple[list[list[str]], list[str]]:
    """The rows of a CSV manifest and its lower-cased header, which must name ``path`` and ``label``."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(
            f"cannot read CSV manifest {text!r}: {exc}; save it as UTF-8 with a header path,label[,split]"
        ) from exc
    if not rows:
        raise DatasetError(
            f"CSV manifest {text!r} is empty; it needs a header row path,label[,split] and one row per image"
        )
    header = [h.strip().lower() for h in rows[0]]
    if "path" not in header or "label" not in header:
        raise DatasetError(
            f"CSV manifest {text!r}: the first row must be a header naming the columns path,label[,split]; got {rows[0]!r}"
        )
    return rows, header


def _manifest_item(raw_path: str, base: Path) -> tuple[Path, str]:
    """A manifest row's image: its absolute path and its id (relative to the manifest's folder when inside it)."""
    given = Path(raw_path).expanduser()
    absolute = Path(os.path.normpath(given if given.is_absolute() else base / given))
    if given.is_absolute():
        try:
            item_id = absolute.relative_to(base).as_posix()
        except ValueError:
            item_id = absolute.as_posix()
    else:
        item_id = Path(os.path.normpath(given)).as_posix()
    return absolute, item_id


def _from_csv(path: Path, text: str, memo_path: Path | None) -> Dataset:
    rows, header = _read_manifest(path, text)
    col_path, col_label = header.index("path"), header.index("label")
    col_split = header.index("split") if "split" in header else None
    width = max(col_path, col_label, col_split or 0) + 1
    base = path.parent.resolve()
    per_split: dict[str, list[tuple[str, str, Path]]] = {s: [] for s in SPLIT_NAMES}
    skipped: list[tuple[str, str]] = []
    seen: dict[Path, int] = {}
    missing: list[tuple[int, str]] = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < width:
            raise DatasetError(
                f"CSV manifest {text!r} line {lineno} has {len(row)} columns, needs {width} ({','.join(header)}): {row!r}"
            )
        raw_path, label = row[col_path].strip(), row[col_label].strip()
        raw_split = row[col_split].strip().lower() if col_split is not None else ""
        if not raw_path or not label:
            raise DatasetError(
                f"CSV manifest {text!r} line {lineno} has an empty path or label: {row!r}; fill it in or remove the row"
            )
        split = _SPLIT_ALIASES.get(raw_split or "train")
        if split is None:
            raise DatasetError(
                f"CSV manifest {text!r} line {lineno} has split {raw_split!r}; "
                f"use one of {choices(_SPLIT_ALIASES)} (empty means train)"
            )
        absolute, item_id = _manifest_item(raw_path, base)
        if absolute.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append((item_id, f"not an image type ({absolute.suffix or 'no extension'})"))
            continue
        if absolute in seen:
            raise DatasetError(
                f"CSV manifest {text!r} lists {raw_path!r} twice (lines {seen[absolute]} and {lineno}); keep one row per image"
            )
        seen[absolute] = lineno
        if not absolute.is_file():
            missing.append((lineno, raw_path))
        per_split[split].append((label, item_id, absolute))
    if missing:
        lineno, raw = missing[0]
        raise DatasetNotFoundError(
            f"{len(missing)} file(s) listed in CSV manifest {text!r} do not exist, first on line {lineno}: {raw!r}; "
            f"paths are relative to the CSV's folder {base} or absolute -- fix them or remove those rows"
        )
    classes = tuple(sorted({label for items in per_split.values() for label, _, _ in items}))
    if not classes:
        raise DatasetError(
            f"CSV manifest {text!r} lists no images ({len(skipped)} rows skipped); add rows path,label[,split]"
        )
    index = {c: i for i, c in enumerate(classes)}
    splits = {
        name: Split(
            name,
            tuple(i for _, i, _ in items),
            np.array([index[lab] for lab, _, _ in items], dtype=np.int64),
            FileItems(tuple(os.fspath(p) for _, _, p in items), memo_path),
        )
        for name, items in per_split.items()
        if items
    }
    return Dataset(_slug(path.stem), text, classes, splits, tuple(skipped))


# ---------------------------------------------------------------------------------- arrays


def _from_npz(path: Path, text: str) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except ValueError as exc:
        raise DatasetError(
            f"cannot read {text!r} without pickle ({exc}); store class names as np.array(names, dtype=str), not as objects"
        ) from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"cannot read .npz {text!r}: {exc}; write it with np.savez(path, x=..., y=...)") from exc
    split_keys = {"train": ("x_train", "y_train"), "val": ("x_val", "y_val"), "test": ("x_test", "y_test")}
    named = {s: k for s, k in split_keys.items() if k[0] in arrays or k[1] in arrays}
    if "x_validation" in arrays or "y_validation" in arrays:
        if "val" in named:
            raise DatasetError(f".npz {text!r} has both x_val and x_validation; keep one")
        named["val"] = ("x_validation", "y_validation")
    if ("x" in arrays or "y" in arrays) and named:
        raise DatasetError(
            f".npz {text!r} has both x/y and per-split arrays ({', '.join(sorted(arrays))}); keep one form"
        )
    if "x" in arrays or "y" in arrays:
        named = {"train": ("x", "y")}
    if not named:
        raise DatasetError(
            f".npz {text!r} has arrays {', '.join(sorted(arrays)) or '(none)'}; expected x and y, or x_train/y_train "
            "(optionally x_val/y_val, x_test/y_test), plus an optional classes array"
        )
    split_arrays = {}
    for split in SPLIT_NAMES:
        if split not in named:
            continue
        kx, ky = named[split]
        if kx not in arrays or ky not in arrays:
            raise DatasetError(
                f".npz {text!r} has {kx if kx in arrays else ky} but not {ky if kx in arrays else kx}; save both"
            )
        split_arrays[split] = (arrays[kx], arrays[ky])
    classes = arrays.get("classes")
    return _from_arrays(_slug(path.stem), text, split_arrays, classes)


def _from_arrays(
    name: str,
    text: str,
    split_arrays: Mapping[str, tuple[np.ndarray, np.ndarray]],
    classes: np.ndarray | Sequence[str] | None,
    ids: Mapping[str, Sequence[str]] | None = None,
) -> Dataset:
    images: dict[str, np.ndarray] = {}
    raw_labels: dict[str, np.ndarray] = {}
    for split, (x, y) in split_arrays.items():
        x, y = np.asarray(x), np.asarray(y)
        images[split] = _as_uint8_images(x, f"{text!r} {split} images")
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.ndim != 1 or len(y) != len(x):
            raise DatasetError(f"{text!r} {split} labels have shape {y.shape}; need ({len(x)},), one label per image")
        raw_labels[split] = y
    if classes is not None:
        class_names = tuple(str(c) for c in np.asarray(classes).reshape(-1))
        if len(set(class_names)) != len(class_names):
            raise DatasetError(f"{text!r} classes array has duplicate names; every class needs a unique name")
    else:
        class_names = None
    labels: dict[str, np.ndarray] = {}
    all_y = [y for y in raw_labels.values()]
    if all(y.dtype.kind in "US" for y in all_y):
        names = class_names or tuple(sorted({str(v) for y in all_y for v in y}))
        index = {c: i for i, c in enumerate(names)}
        for split, y in raw_labels.items():
            unknown = sorted({str(v) for v in y} - index.keys())
            if unknown:
                raise DatasetError(
                    f"{text!r} {split} labels {unknown[:5]} are not in the classes array; add them or fix the labels"
                )
            labels[split] = np.array([index[str(v)] for v in y], dtype=np.int64)
        class_names = names
    elif all(y.dtype.kind in "iub" for y in all_y):
        values = np.unique(np.concatenate([y.astype(np.int64) for y in all_y])) if all_y else np.zeros(0, np.int64)
        if values.size and values.min() < 0:
            raise DatasetError(
                f"{text!r} has negative labels ({int(values.min())}); labels must be class indices >= 0 or class names"
            )
        if class_names is not None:
            if values.size and values.max() >= len(class_names):
                raise DatasetError(f"{text!r} has label {int(values.max())} but only {len(class_names)} class names")
            labels = {s: y.astype(np.int64) for s, y in raw_labels.items()}
        else:
            # Names are the label values; dense indices in numeric order.
            class_names = tuple(str(int(v)) for v in values)
            labels = {s: np.searchsorted(values, y.astype(np.int64)).astype(np.int64) for s, y in raw_labels.items()}
    else:
        kinds = sorted({str(y.dtype) for y in all_y})
        raise DatasetError(
            f"{text!r} labels have dtype {', '.join(kinds)}; use integer class indices or class-name strings"
        )
    splits = {}
    for split in SPLIT_NAMES:
        if split in images and len(images[split]):
            split_ids = tuple(ids[split]) if ids is not None else tuple(str(i) for i in range(len(images[split])))
            splits[split] = Split(split, split_ids, labels[split], ArrayItems(images[split]))
    if not splits:
        raise DatasetError(f"{text!r} contains no images")
    return Dataset(name, text, class_names, splits, ())


def _as_uint8_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3):
        raise DatasetError(f"{where} have shape {x.shape}; need (n, H, W), (n, H, W, 1) or (n, H, W, 3)")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind in "iu":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DatasetError(
                f"{where} are {x.dtype} with values {x.min()}..{x.max()}; need 0..255 (save them as uint8)"
            )
        return x.astype(np.uint8)
    raise DatasetError(
        f"{where} have dtype {x.dtype}; save them as uint8 0..255 "
        "(e.g. np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for floats in [0, 1])"
    )


# ---------------------------------------------------------------------------------- named datasets


def _from_keras(name: str, text: str) -> Dataset:
    if name not in KERAS_DATASETS:
        raise DatasetError(
            f"unknown Keras dataset {name!r} in {text!r}; choose one of {choices(KERAS_DATASETS)}, e.g. keras:cifar10"
        )
    url, classes = KERAS_DATASETS[name]
    import keras  # lazy: heavy

    loader = getattr(keras.datasets, name).load_data
    try:
        (x_train, y_train), (x_test, y_test) = loader(label_mode="fine") if name == "cifar100" else loader()
    except Exception as exc:  # offline, a proxy, a corrupt cached archive: all end the same way
        wanted = re.search(r"https?://[^\s'\"]+", str(exc))
        url = wanted.group(0).rstrip(":.,;") if wanted else url
        cache = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "datasets"
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise DatasetError(
            f"keras:{name} could not be loaded: Keras needs {url} (cached under {cache}) and failed with: {detail}; "
            f"run once with internet access so Keras caches it, or export it to an .npz (x_train, y_train, x_test, y_test) "
            f"or an image folder and pass that path"
        ) from exc
    return _from_arrays(name, text, {"train": (x_train, y_train), "test": (x_test, y_test)}, classes)


def _from_builtin(name: str, text: str) -> Dataset:
    if name not in BUILTIN_DATASETS:
        raise DatasetError(
            f"unknown builtin dataset {name!r} in {text!r}; choose one of {choices(BUILTIN_DATASETS)}, e.g. builtin:digits"
        )
    from sklearn.datasets import load_digits  # lazy: scikit-learn is slow to import

    digits = load_digits()
    # 0..16 grey levels -> 0..255; exact halves cannot occur except 8 -> 127.5, which rint sends to 128.
    images = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    n = len(labels)
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    n_val, n_test = round(n * _DIGITS_FRACTIONS[1]), round(n * _DIGITS_FRACTIONS[2])
    test_idx = stratified_choice(labels, k=n_test, rng=rng)
    rest = np.setdiff1d(np.arange(n), test_idx)
    val_idx = rest[stratified_choice(labels[rest], k=n_val, rng=rng)]
    train_idx = np.setdiff1d(rest, val_idx)
    parts = {"train": train_idx, "val": val_idx, "test": test_idx}
    return _from_arrays(
        "digits",
        text,
        {s: (images[idx], labels[idx]) for s, idx in parts.items()},
        tuple(str(i) for i in range(10)),
        ids={s: [str(int(i)) for i in idx] for s, idx in parts.items()},
    )
