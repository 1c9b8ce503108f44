"""The data core of the SimCLR studies: containers, splits, label fractions, loading, batches.

Every source ends in the same small interface (SimCLR v2, arXiv 2006.10029, section 3: task-agnostic
pretraining on unlabeled images, then fine-tuning on 1% / 10% of the labels, then distillation on
the unlabeled images again):

* ``load_task(name_or_path, ...) -> TaskData``: labeled train / val / test splits and class names.
  The validation split is carved from train (seeded, stratified) when the source has none; model
  selection uses val, and test is only reported.
* ``load_unlabeled(name_or_path, ...) -> ImageSet``: images without labels, for pretraining and
  distillation.
* ``labeled_fraction(split, fraction, seed)``: the class-balanced 1% / 10% label subsets.
* ``BatchLoader``: uint8 batches (B, 3, H, W) on the device, in an order that is a pure function of
  (seed, epoch, rank, world_size), so that a resumed or sharded run sees exactly the same batches.

Images are always uint8 (N, H, W, 3) arrays on the host (a memory map for decoded folders), so
augmentation (augment.py) runs on the device, after the copy.

Sources: the embedded procedural world of shapes.py ("shapes2", "shapes5", "shapes47", "shapes100"
and the unlabeled "shapes-pool"), with no files and no network, so the studies run anywhere; and, in
sources.py, image folders decoded once into a cache, CIFAR pickles, and the downloads of cifar10,
cifar100, tf_flowers, dtd, food101 and cats_vs_dogs. This file wraps what they return into its
containers and carves the splits a source lacks (test, then validation).

``python data.py --help`` lists the command-line tools (grid, info, download, bench).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import options
import shapes
import sources
from options import HelpFormatter, UserError
from shapes import EMBEDDED_TASKS, POOL_NAME


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageSet:
    """Images with optional labels.

    images: (N, H, W, 3) uint8, H == W (a np.memmap for decoded folders). For decoded image folders
        H is the cache resolution, a little larger than the requested working size (see
        ``sources.cache_resolution``); consumers crop or resize to their working size, as SimCLRAugment does.
    labels: (N,) int64 class indices into ``classes``, or None for unlabeled images.
    classes: class names (may be empty for unlabeled images).
    """

    images: np.ndarray
    labels: np.ndarray | None
    classes: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def batches(self, batch_size: int, device: str | torch.device) -> BatchLoader:
        """Every image once, in order, as uint8 batches on ``device`` (evaluation, feature extraction)."""
        return BatchLoader(self, batch_size, device, shuffle=False, drop_last=False)

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images at ``index`` (a copy; a memory map is read only where indexed)."""
        index = np.asarray(index, dtype=np.int64)
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(np.ascontiguousarray(self.images[index]), labels, list(self.classes))


@dataclasses.dataclass
class TaskData:
    """A labeled task: train / val / test splits sharing one list of class names."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------------------------
# Seeded, stratified splits
# ----------------------------------------------------------------------------------------------

_TEST_SPLIT_SEED = 0  # test splits carved for sources without one never depend on the run's seed
_TEST_FRACTION = 0.2


def _allocate(counts: np.ndarray, total: int, keep_one: bool) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainders), so the result
    sums to ``total`` exactly when possible; with keep_one, every class of >= 2 keeps one image out."""
    cap = np.where(counts >= 2, counts - 1, 0) if keep_one else counts.copy()
    total = int(min(total, cap.sum()))
    exact = counts * (total / max(int(counts.sum()), 1))
    take = np.minimum(np.floor(exact).astype(np.int64), cap)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    while take.sum() < total:
        for c in order:
            if take.sum() >= total:
                break
            if take[c] < cap[c]:
                take[c] += 1
    return take


def stratified_split(labels: np.ndarray | None, n_second: int, seed: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first, second) with ``n_second`` images in the second part, each class split in
    proportion (every class with >= 2 images keeps one in the first part). Both sorted.

    labels: (N,) int64 or None (then a plain seeded random split of ``n`` items).
    """
    rng = np.random.default_rng([int(seed), 0x5A17])
    if labels is None:
        perm = rng.permutation(n)
        return np.sort(perm[n_second:]), np.sort(perm[:n_second])
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=classes.size)
    take = _allocate(counts, n_second, keep_one=True)
    second = []
    for c in range(classes.size):
        members = np.flatnonzero(inverse == c)
        second.append(rng.permutation(members)[: take[c]])
    second_idx = np.sort(np.concatenate(second)) if second else np.zeros(0, np.int64)
    mask = np.ones(labels.shape[0], bool)
    mask[second_idx] = False
    return np.flatnonzero(mask), second_idx


def _stratified_take(labels: np.ndarray | None, k: int, seed: int, n: int) -> np.ndarray:
    """``k`` indices drawn class-proportionally (all of them when k >= n), sorted."""
    if k >= n:
        return np.arange(n)
    if labels is None:
        return np.sort(np.random.default_rng([int(seed), 0x7A4E]).permutation(n)[:k])
    classes, inverse = np.unique(labels, return_inverse=True)
    take = _allocate(np.bincount(inverse, minlength=classes.size), k, keep_one=False)
    rng = np.random.default_rng([int(seed), 0x7A4E])
    picked = [rng.permutation(np.flatnonzero(inverse == c))[: take[c]] for c in range(classes.size)]
    return np.sort(np.concatenate(picked))


def stratified_subset(split: ImageSet, k: int, seed: int = 0) -> ImageSet:
    """``k`` images of ``split`` drawn class-proportionally (the whole split when k >= its size)."""
    return split.subset(_stratified_take(split.labels, int(k), seed, len(split)))


def labeled_fraction(split: ImageSet, fraction: float, seed: int = 0) -> ImageSet:
    """A class-balanced subset with about ``fraction`` of the labels (SimCLR v2's 1% / 10% subsets):
    the images at ``labeled_indices(split, fraction, seed)``, as a copy."""
    return split.subset(labeled_indices(split, fraction, seed))


def labeled_indices(split: ImageSet, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of labeled_fraction's subset: every class gets the same number of images,
    max(1, round(fraction * N / C)), capped by what the class has; which images is seeded."""
    if split.labels is None:
        raise UserError("labeled_fraction needs a labeled split (this ImageSet has no labels)")
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"label fraction must be in (0, 1], got {fraction}")
    if len(split) == 0:
        raise UserError("labeled_fraction got an empty split")
    classes = np.unique(split.labels)
    per_class = max(1, int(round(fraction * len(split) / classes.size)))
    rng = np.random.default_rng([int(seed), 0x1AB1])
    picked = []
    for c in classes:
        members = np.flatnonzero(split.labels == c)
        picked.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(picked))


def _carve(train: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, val): a seeded, stratified validation split taken out of train."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * len(train)))
    keep, val = stratified_split(train.labels, n_val, seed, len(train))
    return train.subset(keep), train.subset(val)


# ----------------------------------------------------------------------------------------------
# Names: the embedded tasks, the pool, the datasets of sources.DATASETS, @class selections
# ----------------------------------------------------------------------------------------------

CLASS_MARK = "@"  # NAME@class+class: a task of some of a dataset's classes, in that order


def split_classes(name: str) -> tuple[str, list[str] | None]:
    """'cifar10@cat+dog' -> ('cifar10', ['cat', 'dog']); a name without a selection -> (name, None).

    The one way every command selects classes (also inside run_all's --data map, whose separators
    are ',', '=' and ':'). A path that exists as written is never split, so a folder whose name holds
    an '@' still loads whole."""
    if CLASS_MARK not in name or Path(name).expanduser().exists():
        return name, None
    base, _, listed = name.rpartition(CLASS_MARK)
    chosen = [c.strip() for c in listed.split("+")]
    if not base.strip() or not all(chosen):
        raise UserError(f"{name!r}: select classes as NAME{CLASS_MARK}class+class, e.g. cifar10{CLASS_MARK}cat+dog.")
    twice = sorted({c for c in chosen if chosen.count(c) > 1})
    if twice:
        raise UserError(f"{name!r} names the class{'es' if len(twice) > 1 else ''} {', '.join(map(repr, twice))} twice.")
    return base, chosen


def known_names() -> list[str]:
    """Every dataset name this file knows: the embedded tasks, the pool, sources.DATASETS, cifar100_coarse."""
    return [*EMBEDDED_TASKS, POOL_NAME, *sources.DATASETS, "cifar100_coarse"]


def _unknown(name: str) -> UserError:
    return UserError(f"unknown dataset {name!r} (and no such folder). Known names: {', '.join(known_names())}; or pass a folder path.")


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith((".", "~")) or Path(name).exists()


def _is_coarse(name: str) -> bool:
    """'cifar100_coarse' (CIFAR-100's 20 superclasses) in any spelling sources.normalise accepts; its key is cifar100."""
    return name.strip().lower().replace("-", "_") == "cifar100_coarse"


def num_classes(name: str) -> int | None:
    """Classes of a labeled task named by an embedded or dataset name (with or without an
    @class+class selection), without loading it; None for a folder."""
    base, chosen = split_classes(name)
    if chosen is not None:
        return len(chosen)
    key = sources.normalise(base)
    if key in EMBEDDED_TASKS:
        return EMBEDDED_TASKS[key]
    if _is_coarse(base):
        return 20
    return sources.DATASETS[key]["classes"] if key in sources.DATASETS else None


def is_present(name: str, root: str | Path | None = None) -> bool:
    """Whether a task can load without a download: embedded, a folder that exists, or a named
    dataset already under ``root``."""
    base = split_classes(name)[0]
    key = sources.normalise(base)
    if key not in sources.DATASETS:
        return key in EMBEDDED_TASKS or key == POOL_NAME or Path(base).expanduser().exists()
    try:
        sources.locate(key, root, fetch=False)
    except UserError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# The uniform interface
# ----------------------------------------------------------------------------------------------

# Default sizes of the embedded tasks (train before the validation carve, test): small enough for
# a 2-core CPU run of all three studies, balanced classes.
EMBEDDED_SIZES: dict[str, tuple[int, int]] = {
    "shapes2": (1000, 500),
    "shapes5": (1000, 500),
    "shapes47": (1880, 940),
    "shapes100": (2000, 1000),
}
DEFAULT_POOL_SIZE = 10000


def _finish(name, train, val, test, classes, val_fraction, seed, n_train, n_test) -> TaskData:
    """Subsample (n_train with ``seed``, n_test with the fixed test seed), carve val when missing."""
    if n_train is not None and n_train < len(train):
        train = train.subset(_stratified_take(train.labels, int(n_train), seed, len(train)))
    if n_test is not None and n_test < len(test):
        test = test.subset(_stratified_take(test.labels, int(n_test), _TEST_SPLIT_SEED, len(test)))
    val_used = val is not None or val_fraction > 0  # val_fraction 0 asks for no validation split
    if val is None:
        train, val = _carve(train, val_fraction, seed)
    for split in (train, val, test):
        split.classes = list(classes)
    used = {"train": train, "val": val, "test": test} if val_used else {"train": train, "test": test}
    _check_labeled(name, list(classes), used)
    return TaskData(name, train, val, test, list(classes))


def _check_labeled(name: str, classes: list[str], splits: dict[str, ImageSet]) -> None:
    """Refuse a labeled task that would train or report nonsense: fewer than two classes (with one,
    every prediction is right and top-1 1.0 means nothing), an empty split (train, test, and val
    when it is used), or a class without an image in train (never learned) or in test (never
    measured). In val a missing class is allowed: val only picks the best epoch, and a small carve
    (the tiny preset's 20 val images for 100 classes) cannot hold every class."""
    if len(classes) < 2:
        raise UserError(
            f"{name}: a labeled task needs at least 2 classes; found {len(classes)} ({', '.join(classes) or 'none'}). "
            "Add a folder per class (root/class_name/image.jpg), or use the images unlabeled (pretraining)."
        )
    counts = {s: np.bincount(split.labels, minlength=len(classes)) for s, split in splits.items()}
    total = sum(counts.values())
    empty = [split_name for split_name, count in counts.items() if count.sum() == 0]
    if empty:
        fewest = ", ".join(f"'{classes[c]}' {total[c]}" for c in np.argsort(total, kind="stable")[:5])
        raise UserError(
            f"{name}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty: {int(total.sum())} "
            f"labeled images are too few to set some aside (fewest per class: {fewest}). Add images to every class."
        )
    for split_name, effect in (("train", "it could not be learned"), ("test", "the test accuracy would not measure it")):
        missing = np.flatnonzero(counts[split_name] == 0)
        if missing.size:
            named = ", ".join(f"'{classes[c]}'" for c in missing[:5]) + (" and others" if missing.size > 5 else "")
            raise UserError(f"{name}: class {named} has no image in the {split_name} split ({missing.size} such "
                            f"class(es)); {effect}. Add images of it to that split, or leave the class out.")


def _from_source(label: str, splits: dict[str, sources.Labeled], val_fraction, seed, n_train, n_test) -> TaskData:
    """_finish for the splits a source publishes (sources.dataset_splits, folder_splits); a source
    without a test split gets a stratified 20% carve with a fixed seed, so every run tests alike."""
    sets = {split: ImageSet(*labeled) for split, labeled in splits.items()}
    train, test = sets["train"], sets.get("test")
    if test is None:
        rest, test_idx = stratified_split(train.labels, int(round(_TEST_FRACTION * len(train))), _TEST_SPLIT_SEED)
        train, test = train.subset(rest), train.subset(test_idx)
    return _finish(label, train, sets.get("val"), test, train.classes, val_fraction, seed, n_train, n_test)


def _select(label: str, chosen: list[str], task: TaskData) -> tuple[ImageSet, ImageSet | None, ImageSet]:
    """The splits of ``task`` with only the ``chosen`` classes, relabelled 0.. in the order given
    (val None when the task's source has none, as load_task(val_fraction=0) leaves it empty)."""
    index = {c: k for k, c in enumerate(task.classes)}
    unknown = [c for c in chosen if c not in index]
    if unknown:
        shown = ", ".join(task.classes[:40]) + (f" ... ({len(task.classes)} in all)" if len(task.classes) > 40 else "")
        raise UserError(f"{label}: {task.name} has no class {', '.join(map(repr, unknown))}. Its classes: {shown}.")
    new_label = np.full(len(task.classes), -1, np.int64)
    new_label[[index[c] for c in chosen]] = np.arange(len(chosen))

    def keep(split: ImageSet) -> ImageSet:
        out = split.subset(np.flatnonzero(new_label[split.labels] >= 0))
        out.labels, out.classes = new_label[out.labels], list(chosen)
        return out
    return keep(task.train), keep(task.val) if len(task.val) else None, keep(task.test)


def _selected_task(name: str, chosen: list[str], image_size, root, val_fraction, seed, n_train, n_test, download,
                   cache_dir, skip_bad) -> TaskData:
    """load_task for NAME@class+class: the whole task first (no subsample, no validation carve),
    then the classes, then n_train / n_test and the carve on what is left. An embedded task is
    generated large enough that about n_train / n_test images remain after the selection."""
    if len(chosen) < 2:
        raise UserError(f"{name}{CLASS_MARK}{chosen[0]}: a labeled task needs at least two classes; name two or more, "
                        f"joined by '+' (e.g. cifar10{CLASS_MARK}cat+dog).")
    key = sources.normalise(name)
    grow = lambda n: None if n is None else -(-int(n) * EMBEDDED_TASKS[key] // len(chosen))  # noqa: E731
    sizes = (grow(n_train if n_train is not None else EMBEDDED_SIZES[key][0]),
             grow(n_test if n_test is not None else EMBEDDED_SIZES[key][1])) if key in EMBEDDED_TASKS else (None, None)
    whole = load_task(name, image_size, root, 0.0, seed, *sizes, download, cache_dir, skip_bad)
    label = f"{whole.name}{CLASS_MARK}{'+'.join(chosen)}"
    train, val, test = _select(label, chosen, whole)
    return _finish(label, train, val, test, chosen, val_fraction, seed, n_train, n_test)


def load_task(
    name_or_path: str | Path,
    image_size: int = 32,
    root: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
) -> TaskData:
    """A labeled task with train / val / test splits.

    name_or_path: an embedded task (shapes2, shapes5, shapes47, shapes100), a named dataset
        (cifar10, cifar100, cifar100_coarse, tf_flowers, dtd, food101, cats_vs_dogs; looked up under
        ``root``, default sources.default_data_root(), downloaded there when ``download``), or a folder:
        CIFAR pickles, root/class/img, or root/{train,test[,val]}/class/img. Any of them followed by
        @class+class (``cifar10@cat+dog``) is a task of those classes only, labelled 0.. in the order
        given (split_classes); n_train and n_test then count the selected classes' images.
    image_size: working size. Embedded and CIFAR images come at exactly this size; decoded folders
        at sources.cache_resolution(image_size) (a margin for crops, see sources.py's image folders).
    n_train / n_test: size of the train split before the validation carve / of the test split
        (embedded: defaults in EMBEDDED_SIZES; real data: all, else a stratified subsample).
    val_fraction: share of train carved out as validation (seeded by ``seed``, stratified) when the
        source has no validation split (DTD has one and keeps it).
    seed: embedded tasks: the whole dataset; real data: the train subsample and validation carve
        (test splits carved for sources without one use a fixed seed, so every run tests alike).
    """
    name, chosen = split_classes(str(name_or_path))
    if chosen is not None:
        return _selected_task(name, chosen, image_size, root, val_fraction, seed, n_train, n_test, download,
                              cache_dir, skip_bad)
    key = sources.normalise(name)
    if key in EMBEDDED_TASKS:
        d_train, d_test = EMBEDDED_SIZES[key]
        n_tr, n_te = int(n_train if n_train is not None else d_train), int(n_test if n_test is not None else d_test)
        if n_tr < EMBEDDED_TASKS[key] or n_te < EMBEDDED_TASKS[key]:
            raise UserError(f"{key} has {EMBEDDED_TASKS[key]} classes: n_train and n_test must be at least that (got {n_tr}, {n_te})")
        train = ImageSet(*shapes.generate(key, n_tr, "train", image_size, seed))
        test = ImageSet(*shapes.generate(key, n_te, "test", image_size, seed))
        return _finish(key, train, None, test, train.classes, val_fraction, seed, None, None)
    if key == POOL_NAME:
        raise UserError(f"{POOL_NAME} is the unlabeled pretraining pool; load it with load_unlabeled('{POOL_NAME}')")
    if key in sources.DATASETS:
        coarse = _is_coarse(name)
        splits = sources.dataset_splits(key, coarse, image_size, root, download, cache_dir, skip_bad)
        return _from_source(key + ("_coarse" if coarse else ""), splits, val_fraction, seed, n_train, n_test)
    if not _looks_like_path(name):
        raise _unknown(name)
    folder = sources.check_folder(name)
    splits = sources.folder_splits(folder, image_size, cache_dir, skip_bad)
    return _from_source(folder.name, splits, val_fraction, seed, n_train, n_test)


def load_unlabeled(
    name_or_path: str | Path,
    image_size: int = 32,
    n: int | None = None,
    root: str | Path | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
    download: bool = False,
) -> ImageSet:
    """Unlabeled images for pretraining / distillation (labels None).

    "shapes-pool": the embedded pool (default DEFAULT_POOL_SIZE images), uniform over all 147
        structures of the embedded tasks, from its own seed namespace: it holds no image of any
        embedded task's train, val or test split (see shapes.generate()).
    An embedded task or named dataset: its train split (before the validation carve), labels
        dropped; never its test split. With @class+class (split_classes), those classes' only.
        (Embedded tasks: ``n`` images of the train namespace; with n None, exactly the images
        load_task(name, seed=seed) splits into train and val.)
    A folder: every image under it, recursively (a flat folder of photos works), as the cache's
        read-only memory map when ``n`` is None.
    n: a seeded random subset of that many images.
    """
    name = str(name_or_path)
    base, chosen = split_classes(name)
    key = sources.normalise(name)
    if key == POOL_NAME:
        out = ImageSet(*shapes.generate(POOL_NAME, int(n if n is not None else DEFAULT_POOL_SIZE), "pool", image_size, seed))
        return out
    if key in EMBEDDED_TASKS:
        m = int(n if n is not None else EMBEDDED_SIZES[key][0])
        return ImageSet(shapes.generate(key, m, "train", image_size, seed)[0], None, [])
    if chosen is not None:  # one class is fine here: no classifier is trained on these
        whole = load_task(base, image_size, root, 0.0, seed, None, None, download, cache_dir, skip_bad)
        images = _select(name, chosen, whole)[0].images
    elif key in sources.DATASETS:
        task = load_task(name, image_size, root, 0.0, seed, None, None, download, cache_dir, skip_bad)
        images = task.train.images
    elif _looks_like_path(name):
        images = sources.unlabeled_folder(name, image_size, cache_dir, skip_bad)
    else:
        raise _unknown(name)
    if n is not None and n < images.shape[0]:
        images = np.ascontiguousarray(images[_stratified_take(None, int(n), seed, images.shape[0])])
    return ImageSet(images, None, [])


# ----------------------------------------------------------------------------------------------
# Batches on the device
# ----------------------------------------------------------------------------------------------


class BatchLoader:
    """Iterates uint8 batches x (B, 3, H, W) (channels_last strides) and labels y (B,) int64 (or
    None), both on ``device``.

    Order: a permutation drawn from (seed, epoch) alone, identical on every rank, then rank
    ``rank`` takes every ``world_size``-th element (DistributedSampler-style sharding: ranks are
    disjoint, each gets the same number of batches; without drop_last the permutation is padded by
    wrapping around so they stay equal). ``epoch(e, start)`` skips the first ``start`` batches, so
    a run resumed mid-epoch sees exactly the batches it would have seen.

    Placement: on CUDA the whole uint8 set is copied to the device once when it takes at most
    ``max_device_bytes`` (default: half the free device memory) and batches are gathered there;
    otherwise each batch is gathered on the host into one of two pinned buffers and copied with
    non_blocking=True (an event guards a buffer until its copy is done). On the CPU a batch is a
    numpy gather wrapped by torch.from_numpy, no further copy.
    """

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        device: str | torch.device,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_device_bytes: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        n = len(images)
        if n == 0:
            raise UserError("BatchLoader got an empty image set")
        self.images, self.batch_size, self.device = images, int(batch_size), torch.device(device)
        self.shuffle, self.drop_last, self.seed, self.rank, self.world_size = shuffle, drop_last, int(seed), int(rank), int(world_size)
        self.per_rank = n // world_size if drop_last else -(-n // world_size)
        if drop_last and self.per_rank < self.batch_size:
            raise UserError(
                f"batch size {batch_size} is larger than the {self.per_rank} images per rank ({n} images, world size {world_size}); "
                "lower the batch size, use more data, or set drop_last=False"
            )
        self._labels = None if images.labels is None else torch.from_numpy(np.asarray(images.labels, np.int64))
        self._resident = None
        self._pinned: list[torch.Tensor] = []
        self._events: list = [None, None]
        if self.device.type == "cuda":
            if self._labels is not None:
                self._labels = self._labels.to(self.device)
            if max_device_bytes is None:
                free, _ = torch.cuda.mem_get_info(self.device)
                max_device_bytes = free // 2
            if images.images.nbytes <= max_device_bytes:
                # Chunked upload: a memory-mapped set is never materialised whole in host memory.
                src = images.images
                self._resident = torch.empty(src.shape, dtype=torch.uint8, device=self.device)
                for lo in range(0, n, 8192):
                    self._resident[lo : lo + 8192].copy_(torch.from_numpy(np.array(src[lo : lo + 8192])))

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's image indices for ``epoch``, in batch order (before dropping the last batch)."""
        n = len(self.images)
        order = np.random.default_rng([self.seed, int(epoch), 0xBA7C]).permutation(n) if self.shuffle else np.arange(n)
        total = self.per_rank * self.world_size
        if total > n:
            order = np.concatenate([order, order[: total - n]])
        return order[:total][self.rank :: self.world_size]

    def epoch(self, e: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Batches of epoch ``e`` from batch index ``start`` on: (x uint8 (B, 3, H, W), y (B,) or None)."""
        order = self.indices(e)
        for b in range(int(start), len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._gather(idx, b), self._gather_labels(idx)

    def __iter__(self):
        return self.epoch(0)

    def _gather_labels(self, idx: np.ndarray) -> torch.Tensor | None:
        if self._labels is None:
            return None
        t = torch.from_numpy(idx)
        if self.device.type == "cuda":
            t = t.to(self.device, non_blocking=True)
        return self._labels[t]

    def _gather(self, idx: np.ndarray, b: int) -> torch.Tensor:
        if self._resident is not None:
            x = self._resident[torch.from_numpy(idx).to(self.device, non_blocking=True)]
        elif self.device.type == "cuda":
            k = b % 2
            if not self._pinned:
                shape = (self.batch_size, *self.images.images.shape[1:])
                self._pinned = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
            if self._events[k] is not None:
                self._events[k].synchronize()  # the copy that last read this buffer is done
            buf = self._pinned[k][: idx.size]
            np.take(self.images.images, idx, axis=0, out=buf.numpy(), mode="clip")  # "clip": no temp copy
            x = buf.to(self.device, non_blocking=True)
            self._events[k] = torch.cuda.Event()
            self._events[k].record()
        else:
            x = torch.from_numpy(np.take(self.images.images, idx, axis=0))
            if self.device.type != "cpu":
                x = x.to(self.device)
        return x.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# Looking at the data
# ----------------------------------------------------------------------------------------------


def save_grid(
    name: str | Path,
    path: str | Path,
    image_size: int = 32,
    per_class: int = 8,
    max_classes: int | None = None,
    seed: int = 0,
    root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    scale: int | None = None,
) -> Path:
    """A PNG with one row of ``per_class`` training images per class (class name at the left), or a
    plain grid for the unlabeled pool / folders; tiles upscaled (nearest) to at least 64 px."""
    key = sources.normalise(str(name))
    if key in EMBEDDED_TASKS:
        c = EMBEDDED_TASKS[key]
        shown = c if max_classes is None else min(c, max_classes)
        data = ImageSet(*shapes.generate(key, per_class * c, "train", image_size, seed))
    elif _unlabeled_source(str(name)):
        data = load_unlabeled(name, image_size, n=per_class * per_class, root=root, seed=seed, cache_dir=cache_dir)
        shown = 0
    else:
        data = load_task(name, image_size, root=root, seed=seed, cache_dir=cache_dir).train
        shown = len(data.classes) if max_classes is None else min(len(data.classes), max_classes)
    scale = scale or max(1, -(-64 // data.image_size))
    tile = data.image_size * scale
    if shown == 0:
        rows = [data.images[r * per_class : (r + 1) * per_class] for r in range(-(-len(data) // per_class))][:per_class]
        names = [""] * len(rows)
    else:
        rows = [data.images[np.flatnonzero(data.labels == k)[:per_class]] for k in range(shown)]
        names = data.classes[:shown]
    margin = 8 + 7 * max((len(s) for s in names), default=0) if shown else 0
    canvas = Image.new("RGB", (margin + per_class * (tile + 2), len(rows) * (tile + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, names)):
        for k, img in enumerate(row):
            canvas.paste(Image.fromarray(np.asarray(img)).resize((tile, tile), Image.Resampling.NEAREST), (margin + k * (tile + 2), r * (tile + 2)))
        if label:
            draw.text((4, r * (tile + 2) + tile // 2 - 5), label, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images in [0, 1], exact, from per-channel histograms."""
    hist = np.zeros((3, 256), np.int64)
    for lo in range(0, images.shape[0], 4096):
        chunk = np.asarray(images[lo : lo + 4096])
        for c in range(3):
            hist[c] += np.bincount(chunk[..., c].ravel(), minlength=256)
    v = np.arange(256) / 255.0
    count = np.maximum(hist.sum(1), 1)
    mean = hist @ v / count
    return mean, np.sqrt(np.maximum(hist @ (v * v) / count - mean * mean, 0.0))


def _unlabeled_source(name: str) -> bool:
    """The pool, or a folder that is neither CIFAR nor root/class/img: shown without labels."""
    key = sources.normalise(name)
    if key == POOL_NAME:
        return True
    if key in sources.DATASETS or key in EMBEDDED_TASKS or not _looks_like_path(name):
        return False
    folder = Path(name).expanduser()
    return folder.is_dir() and sources.cifar_kind(folder) is None and not sources.has_class_folders(folder)


def bench(n: int = 20000, image_size: int = 32, name: str = POOL_NAME) -> tuple[float, float]:
    """Generator speed on one core: (images per CPU-second, images per wall-second).

    Runs with torch threads 1 and CPU affinity one core where possible; the CPU-time figure is the
    one to quote on a shared machine, where other processes stretch the wall time.
    """
    torch.set_num_threads(1)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    shapes.generate(name, min(n, 1024), "bench", image_size, 0)  # warm up caches and code paths
    c0, t0 = time.process_time(), time.perf_counter()
    shapes.generate(name, n, "bench", image_size, 1)
    return n / (time.process_time() - c0), n / (time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python data.py",
        description="Data for the SimCLR studies: look at, inspect, download and benchmark datasets.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("grid", help="save a PNG grid of samples per class", formatter_class=HelpFormatter)
    p.add_argument("name", help=f"dataset name ({', '.join(known_names())}) or folder")
    p.add_argument("--out", default="grid.png", help="PNG file to write")
    _add_size(p)
    p.add_argument("--per-class", type=options.bounded(int, options.AT_LEAST_1, "per-class"), default=8, help="images per class (row)")
    p.add_argument("--max-classes", type=options.bounded(int, options.AT_LEAST_1, "max-classes"), default=20, help="rows to show at most")
    options.add_options(p, options.StageConfig, only=("seed", "root", "cache_dir"))
    p = sub.add_parser("info", help="print splits, classes and channel statistics", formatter_class=HelpFormatter)
    p.add_argument("name", help="dataset name or folder")
    _add_size(p)
    options.add_options(p, options.StageConfig, only=("root", "cache_dir", "skip_bad"))
    p.add_argument("--download", action="store_true", help="download a named dataset if missing")
    p = sub.add_parser("download", help="download and extract a named dataset", formatter_class=HelpFormatter)
    p.add_argument("name", choices=list(sources.DATASETS))
    options.add_options(p, options.StageConfig, only=("root",))
    p.add_argument("--mirror", default=None, help="base URL serving the archives by file name; None: $SIMCLR_MIRROR, else the publisher")
    p = sub.add_parser("bench", help="generator speed on one CPU core", formatter_class=HelpFormatter)
    p.add_argument("--n", type=options.bounded(int, options.AT_LEAST_1, "n"), default=20000, help="images to generate")
    _add_size(p)
    p.add_argument("--name", default=POOL_NAME, help="embedded dataset to render")
    return parser


def _add_size(parser: argparse.ArgumentParser) -> None:
    """--size, the side in pixels that grid, info and bench resize or render images to."""
    parser.add_argument("--size", type=options.bounded(int, options.Range(8), "size"), default=32, help="image size")


def run_command(args: argparse.Namespace) -> None:
    if args.command == "grid":
        out = save_grid(args.name, args.out, args.size, args.per_class, args.max_classes, args.seed, args.root,
                        args.cache_dir)
        print(f"wrote {out}")
    elif args.command == "download":
        print(f"ready: {sources.download(args.name, args.root, args.mirror)}")
    elif args.command == "bench":
        cpu, wall = bench(args.n, args.size, args.name)
        print(f"{args.name} at {args.size}x{args.size}, one core: {cpu:,.0f} images per CPU-second "
              f"({wall:,.0f} per wall-second)")
    else:
        _print_info(args)


def main(argv: Sequence[str] | None = None) -> int:
    return options.main(argv, run=run_command, parser=build_parser())


def _print_info(args: argparse.Namespace) -> None:
    if _unlabeled_source(args.name):
        pool = load_unlabeled(args.name, args.size, root=args.root, cache_dir=args.cache_dir, skip_bad=args.skip_bad)
        mean, std = _stats(pool.images)
        print(f"{args.name}: {len(pool)} unlabeled images, {pool.image_size}x{pool.image_size}")
        print(f"mean {np.round(mean, 4).tolist()}  std {np.round(std, 4).tolist()}")
        return
    task = load_task(args.name, args.size, root=args.root, cache_dir=args.cache_dir, skip_bad=args.skip_bad, download=args.download)
    shown = ", ".join(task.classes[:10]) + (" ..." if task.num_classes > 10 else "")
    print(f"{task.name}: {task.num_classes} classes ({shown})")
    for split_name in ("train", "val", "test"):
        s = getattr(task, split_name)
        counts = np.bincount(s.labels, minlength=task.num_classes) if len(s) else np.zeros(1, int)
        print(f"  {split_name:5s} {len(s):7d} images {s.image_size}x{s.image_size}, per class {counts.min()}..{counts.max()}")
    whole_train = np.concatenate([task.train.images, task.val.images]) if len(task.val) else task.train.images
    mean, std = _stats(whole_train)
    print(f"train+val mean {np.round(mean, 4).tolist()}  std {np.round(std, 4).tolist()}")


if __name__ == "__main__":
    sys.exit(main())
