"""Data for the SimCLR studies: a procedural default dataset, image folders, CIFAR, downloads.

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

Sources:

1. The embedded procedural world of shapes.py ("shapes2", "shapes5", "shapes47", "shapes100" and the
   unlabeled "shapes-pool"): no files and no network, so the studies run anywhere.
2. Image folders (root/class_name/image.ext, or a flat folder of unlabeled photos), decoded once in
   parallel processes and cached as a uint8 .npy memory map outside the user's folder.
3. CIFAR-10 / CIFAR-100 in the official python-pickle layout.
4. Downloads of cifar10, cifar100, tf_flowers, dtd, food101 and cats_vs_dogs from their publishers.

``python data.py --help`` lists the command-line tools (grid, info, download, bench).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import http.client
import json
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

try:
    import fcntl  # POSIX file locks for the decode cache; Windows has none (see _entry_lock)
except ImportError:
    fcntl = None

import shapes
from shapes import EMBEDDED_TASKS, POOL_NAME
import checkpoints
import options
from options import HelpFormatter, UserError


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageSet:
    """Images with optional labels.

    images: (N, H, W, 3) uint8, H == W (a np.memmap for decoded folders). For decoded image folders
        H is the cache resolution, a little larger than the requested working size (see
        ``cache_resolution``); consumers crop or resize to their working size, as SimCLRAugment does.
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
# Image folders: decode once in parallel, cache as a uint8 memory map outside the user's folder
# ----------------------------------------------------------------------------------------------
#
# The cache keeps each image at ``cache_resolution(image_size)`` (about 1.14x the working size, the
# ratio of the usual resize-256 / crop-224 evaluation): the shorter side is resized to it and the
# centred square kept. Trade-offs: the borders of non-square images are lost for good (a random
# crop can never reach them), and the random-resized-crop scale is measured against the centred
# square, not the full photo; in exchange every image is decoded exactly once, batches are plain
# array slices, and a dataset larger than RAM is read from the memory map.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")
CACHE_VERSION = 2  # 2: a file's identity includes its inode and change time (1 had size and mtime only)


def default_cache_dir() -> Path:
    """$SIMCLR_CACHE, else $XDG_CACHE_HOME/simclr, else ~/.cache/simclr."""
    if os.environ.get("SIMCLR_CACHE"):
        return Path(os.environ["SIMCLR_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "simclr"
    return Path.home() / ".cache" / "simclr"


def default_data_root() -> Path:
    """Where named datasets live and are downloaded: $SIMCLR_DATA, else $XDG_DATA_HOME/simclr,
    else ~/.local/share/simclr."""
    if os.environ.get("SIMCLR_DATA"):
        return Path(os.environ["SIMCLR_DATA"]).expanduser()
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]).expanduser() / "simclr"
    return Path.home() / ".local" / "share" / "simclr"


def cache_resolution(image_size: int) -> int:
    """Side of the cached squares for a working size: ceil(1.14 * image_size)."""
    return int(math.ceil(1.14 * image_size))


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _scan(root: Path) -> list[tuple[str, int, int, int, int]]:
    """(relative posix path, size, mtime_ns, inode, ctime_ns) of every image file under root, sorted;
    hidden files and folders (., __MACOSX) are skipped, and so, with a warning, is anything that is
    not a regular file (or a link to one): opening a named pipe would wait for a writer forever.

    The five values are git's index check: `cp -p`, `tar -x` or a restore can replace a file by
    another of the same size with its mtime kept, but the replacement gets a new inode or a new
    change time (ctime moves on every write and rename, and utime cannot set it back)."""
    found = []
    odd = []  # named pipes, sockets, devices that carry an image extension
    seen = set()  # (device, inode) of visited folders: linked folders are followed, link cycles are not
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in filenames:
            if _is_hidden(name) or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:
                continue  # a dangling link: not an image we can read, and not worth stopping for
            rel = Path(path).relative_to(root).as_posix()
            if not stat.S_ISREG(st.st_mode):
                odd.append(rel)
                continue
            found.append((rel, int(st.st_size), int(st.st_mtime_ns), int(st.st_ino), int(st.st_ctime_ns)))
    if odd:
        what = "1 entry that is not a regular file" if len(odd) == 1 else f"{len(odd)} entries that are not regular files"
        warnings.warn(f"{root}: skipped {what} (a named pipe, socket or device): " + ", ".join(sorted(odd)[:20])
                      + (" ..." if len(odd) > 20 else ""), stacklevel=3)
    found.sort()
    return found


def _check_folder(root: Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"{root.absolute()}: folder not found. Pass an existing folder of images (root/class_name/image.jpg), or a dataset name.")
    if not root.is_dir():
        raise UserError(f"{root}: is a file, not a folder. Pass the folder that holds the images.")
    return root.resolve()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB.

    Transparency (RGBA, LA, PA, palette or colour-key transparency) is composited onto white, the
    usual viewer background: the colour under fully transparent pixels is arbitrary in many files
    and must not leak into the data. 16-bit integer images (I;16*) are scaled by 1/257; 32-bit "I"
    images by 1/257 when any value exceeds 255 (16-bit content) and as-is otherwise; float "F"
    images by 255 when they lie in [0, 1], else clipped to [0, 255]. CMYK / YCbCr / LAB use
    Pillow's conversion without colour management (ICC profiles are ignored).
    """
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img)
        a = a.astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.size and a.max() > 255):
            a = a / 257.0
        elif mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def decode_image(path: str | Path, resolution: int) -> np.ndarray:
    """One image file -> (resolution, resolution, 3) uint8: RGB, upright (EXIF orientation applied),
    shorter side resized to ``resolution`` (bicubic, antialiased), centred square kept.

    Raises OSError / ValueError (Pillow's) for unreadable or truncated files.
    """
    with Image.open(path) as img:
        img.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale when possible
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        w, h = img.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
        return np.asarray(img, dtype=np.uint8).copy()


def _decode_chunk(task: tuple[str, list[str], int]) -> tuple[np.ndarray, list[bool], list[tuple[str, str]]]:
    """Worker: decode a list of files relative to root; bad files are reported, not raised."""
    root, rels, res = task
    out = np.zeros((len(rels), res, res, 3), np.uint8)
    ok, bad = [], []
    for k, rel in enumerate(rels):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # EXIF / palette chatter from Pillow, per file
                out[k] = decode_image(os.path.join(root, rel), res)
            ok.append(True)
        except Exception as exc:  # noqa: BLE001 - any failure to decode marks the file bad
            ok.append(False)
            bad.append((rel, f"{type(exc).__name__}: {exc}"))
    return out, ok, bad


def _workers(requested: int | None, n: int) -> int:
    if requested is not None:
        return max(1, int(requested))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8, n // 256))  # small folders decode faster than a pool starts


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C (sent to the whole process group) to the parent, which stops them,
    instead of each printing a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_context():
    # fork on Linux: workers start instantly and only use Pillow / numpy; elsewhere spawn.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _bad_files_error(root: Path, bad: list[tuple[str, str]]) -> UserError:
    lines = "\n".join(f"  {root / rel}: {msg}" for rel, msg in bad)
    return UserError(
        f"{len(bad)} image file(s) under {root} could not be read:\n{lines}\n"
        "Delete or replace them, or pass skip_bad=True (--skip-bad) to leave them out with a warning."
    )


def _cache_entry(cache_dir: Path | None, root: Path, res: int) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    base = base.resolve()
    if base == root or root in base.parents:
        raise UserError(f"cache folder {base} is inside the dataset folder {root}; choose a cache folder outside it (cache_dir= or $SIMCLR_CACHE)")
    if base.exists() and not base.is_dir():
        raise UserError(f"cache folder {base} is a file, not a folder. Pass a folder for the decode cache "
                        "(--cache-dir or $SIMCLR_CACHE); it is created when missing.")
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in root.name)[:40] or "root"
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return base / "folders" / f"{safe}-{digest}-r{res}"


def load_folder_images(
    root: str | Path,
    image_size: int = 32,
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
    workers: int | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Every image under ``root`` (recursive) as a read-only uint8 memory map
    (N, R, R, 3), R = cache_resolution(image_size), and the files' paths relative to root.

    The first call decodes in parallel processes and writes the cache (atomically: a temp file, then
    os.replace); later calls only list the folder and compare each file's name, size, mtime, inode
    and change time with the manifest (_scan), so an added, removed, modified or replaced file
    triggers a new decode. Nothing is written under
    ``root``. Unreadable files: all are listed in one UserError, or skipped with a warning when
    ``skip_bad``. Runs that load the same folder at once share one decode: the first writes the
    cache while the others wait for it (see _entry_lock).
    """
    root = _check_folder(root)
    res = cache_resolution(image_size)
    files = _scan(root)
    if not files:
        raise UserError(f"{root}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)}). Put images in it, or point to the folder that holds them.")
    entry = _cache_entry(cache_dir, root, res)
    listing = [list(f) for f in files]
    if (entry / "manifest.json").exists():
        with _entry_lock(entry, exclusive=False):
            cached = _cached(entry, res, listing, root, skip_bad)
        if cached is not None:
            return cached
    _make_entry(entry)
    with _entry_lock(entry, exclusive=True) as locked:
        cached = _cached(entry, res, listing, root, skip_bad)  # another run may have written it meanwhile
        if cached is not None:
            return cached
        return _decode_to_cache(root, files, res, entry, skip_bad, workers, progress, locked)


def _cached(entry: Path, res: int, listing: list[list], root: Path, skip_bad: bool) -> tuple[np.ndarray, list[str]] | None:
    """The entry's images and file names when its manifest matches the folder's listing, else None."""
    manifest_path = entry / "manifest.json"
    manifest = None
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            manifest = None
    if (
        manifest is not None
        and manifest.get("version") == CACHE_VERSION
        and manifest.get("resolution") == res
        and manifest.get("files") == listing
        and (entry / manifest.get("npy", "")).is_file()
    ):
        images = np.load(entry / manifest["npy"], mmap_mode="r")
        if images.shape[0] == len(manifest["images"]):
            bad = [tuple(b) for b in manifest.get("bad", [])]
            if bad and not skip_bad:
                raise _bad_files_error(root, bad)
            if bad:
                warnings.warn(f"{len(bad)} unreadable image file(s) under {root} left out (cached decision)", stacklevel=3)
            return images, list(manifest["images"])
    return None


def _make_entry(entry: Path) -> None:
    """Create a cache entry's folder, or say why it cannot be created."""
    try:
        entry.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cache folder {entry} cannot be created ({exc.strerror or exc}). Choose another cache "
                        "folder (--cache-dir or $SIMCLR_CACHE).") from None


@contextlib.contextmanager
def _entry_lock(entry: Path, exclusive: bool) -> Iterator[bool]:
    """Hold a lock on one cache entry: shared while a run reads it, exclusive while a run writes it.

    So a writer never deletes an array that another run is about to open, and two runs never
    decode the same folder at once: the second waits, then finds the cache ready. The operating
    system drops the lock of a process that dies, so a killed run never leaves a stale lock.
    Yields whether a lock is held: none on Windows (no fcntl), in a read-only cache, or where the
    file system refuses locks; runs then go ahead unlocked.
    """
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(entry / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        yield fd is not None and _lock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, entry)
    finally:
        if fd is not None:
            os.close(fd)  # closing the file releases the lock


def _lock(fd: int, mode: int, entry: Path) -> bool:
    """flock(fd, mode), saying so when it has to wait; False where the file system has no locks."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    except OSError:
        return False  # ENOLCK, EOPNOTSUPP: some network file systems
    print(f"waiting for another process that is using the decode cache {entry} ...", file=sys.stderr, flush=True)
    fcntl.flock(fd, mode)
    return True


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"


def _check_free_space(entry: Path, shape: tuple[int, ...]) -> None:
    """Refuse a decode whose array cannot fit on the cache's disk. The memory map is a sparse file:
    a write into it on a full disk kills the process with SIGBUS instead of raising an error."""
    needed = math.prod(shape)
    free = shutil.disk_usage(entry).free
    if needed > free:
        raise UserError(f"not enough free space for the decode cache in {entry}: {shape[0]} images at "
                        f"{shape[1]}x{shape[2]} need {_megabytes(needed)}, and {_megabytes(free)} are free. Free some "
                        "space, or choose another cache folder (--cache-dir or $SIMCLR_CACHE).")


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of a new, sparse file now, so that a disk that filled up since the
    free-space check gives an OSError here and not a SIGBUS during the decode."""
    if not hasattr(os, "posix_fallocate"):
        return  # macOS, Windows: the free-space check is the only guard
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # no preallocation on this file system
            raise
    finally:
        os.close(fd)


def _cache_write_error(entry: Path, shape: tuple[int, ...], exc: OSError) -> UserError:
    free = ""
    with contextlib.suppress(OSError):
        free = f", {_megabytes(shutil.disk_usage(entry).free)} free now"
    return UserError(f"could not write the decode cache in {entry}: {exc.strerror or exc}. {shape[0]} images at "
                     f"{shape[1]}x{shape[2]} need {_megabytes(math.prod(shape))}{free}; nothing was kept. Free some "
                     "space, or choose another cache folder (--cache-dir or $SIMCLR_CACHE).")


def _decode_to_cache(root, files, res, entry, skip_bad, workers, progress, locked=False):
    """Decode into a temporary .npy of this process, rename it into place, then write the manifest
    that names it (the last complete writer wins; the manifest never names a missing or partial
    file). ``locked``: this run holds the entry's exclusive lock, so any temporary file found is a
    killed run's leftover, and is removed."""
    if locked:
        for stale in entry.glob(".images-*.npy.tmp*"):
            with contextlib.suppress(OSError):
                stale.unlink()
    rels = [f[0] for f in files]
    n = len(rels)
    token = f"{os.getpid()}-{time.time_ns()}"
    npy = entry / f"images-{token}.npy"
    tmp = entry / f".images-{token}.npy.tmp"
    shape = (n, res, res, 3)
    _check_free_space(entry, shape)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _reserve(tmp)
        kept, bad = _decode_into(out, root, rels, res, workers, progress)
        if bad and not skip_bad:
            raise _bad_files_error(root, bad)
        if not kept:
            raise UserError(f"{root}: none of the {n} image files could be read")
        if bad:
            warnings.warn(f"left out {len(bad)} unreadable image file(s) under {root}: " + ", ".join(r for r, _ in bad[:20]) + (" ..." if len(bad) > 20 else ""), stacklevel=3)
        out.flush()
        del out
        if len(kept) < n:  # rewrite without the rows the bad files left empty
            _shrink(tmp, entry / f".images-{token}.npy.tmp2", len(kept))
        os.replace(tmp, npy)
        manifest = {
            "version": CACHE_VERSION,
            "root": str(root),
            "resolution": res,
            "npy": npy.name,
            "files": [list(f) for f in files],
            "images": kept,
            "bad": [list(b) for b in bad],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        checkpoints.atomic_write(entry / "manifest.json", lambda f: f.write(json.dumps(manifest)), "w", raw_errors=True)
    except OSError as exc:  # a full disk, a read-only or vanished cache: the user's to fix, not a bug
        npy.unlink(missing_ok=True)
        raise _cache_write_error(entry, shape, exc) from None
    finally:
        for leftover in entry.glob(f".images-{token}.npy.tmp*"):
            leftover.unlink(missing_ok=True)
    for old in entry.glob("images-*.npy"):  # earlier versions of this entry, now unreferenced
        if old != npy:
            with contextlib.suppress(OSError):
                old.unlink()
    return np.load(npy, mmap_mode="r"), kept


def _decode_into(out: np.ndarray, root: Path, rels: list[str], res: int, workers, progress) -> tuple[list[str], list[tuple[str, str]]]:
    """Decode ``rels`` (in parallel processes when there are many) into the first rows of ``out``,
    in order, readable files only; returns (names kept, (name, error) of the unreadable ones)."""
    n = len(rels)
    kept: list[str] = []
    bad: list[tuple[str, str]] = []
    n_workers = _workers(workers, n)
    step = max(8, min(256, n // (n_workers * 8) + 1))
    tasks = [(str(root), rels[i : i + step], res) for i in range(0, n, step)]
    bar = tqdm(total=n, desc=f"decoding {root.name} at {res}px", unit="img", disable=(not progress) if progress is not None else None)
    with contextlib.ExitStack() as stack:
        if n_workers > 1:
            pool = stack.enter_context(_pool_context().Pool(n_workers, initializer=_ignore_sigint))
            results = pool.imap(_decode_chunk, tasks)
        else:
            results = map(_decode_chunk, tasks)
        for (_, chunk, _), (arr, ok, chunk_bad) in zip(tasks, results):
            good = np.flatnonzero(ok)
            out[len(kept) : len(kept) + good.size] = arr[good]
            kept.extend(chunk[i] for i in good)
            bad.extend(chunk_bad)
            bar.update(len(chunk))
    bar.close()
    return kept, bad


def _shrink(tmp: Path, tmp2: Path, k: int) -> None:
    """Rewrite the .npy at ``tmp`` with its first ``k`` images only (through ``tmp2``)."""
    full = np.load(tmp, mmap_mode="r")
    short = np.lib.format.open_memmap(tmp2, mode="w+", dtype=np.uint8, shape=(k, *full.shape[1:]))
    _reserve(tmp2)
    for lo in range(0, k, 4096):
        hi = min(lo + 4096, k)
        short[lo:hi] = full[lo:hi]
    short.flush()
    del short, full
    os.replace(tmp2, tmp)


def _class_folders(root: Path, rels: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(class names, labels of the images in class folders, their indices) for root/class/... .

    A class folder without images, or a root without class folders, is a UserError.
    """
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not _is_hidden(d.name))
    tops = [r.split("/", 1)[0] if "/" in r else None for r in rels]
    with_images = {t for t in tops if t is not None}
    if not with_images:
        raise UserError(
            f"{root}: no class folders with images. A labeled dataset needs root/class_name/image.jpg; "
            "for a flat folder of unlabeled images use load_unlabeled (or pretraining only)."
        )
    empty = [d for d in subdirs if d not in with_images]
    if empty:
        raise UserError(
            f"{root}: class folder(s) without images: " + ", ".join(str(root / d) for d in empty)
            + f". Add images ({', '.join(IMAGE_EXTENSIONS[:6])}, ...) or remove the folder(s)."
        )
    loose = sum(t is None for t in tops)
    if loose:
        warnings.warn(f"{root}: {loose} image(s) directly in the root folder belong to no class and are ignored", stacklevel=3)
    classes = sorted(with_images)
    cid = {c: k for k, c in enumerate(classes)}
    index = np.array([i for i, t in enumerate(tops) if t is not None], np.int64)
    labels = np.array([cid[tops[i]] for i in index], np.int64)
    return classes, labels, index


def _labeled_folder(root: Path, image_size: int, cache_dir, skip_bad: bool) -> tuple[ImageSet, list[str]]:
    images, rels = load_folder_images(root, image_size, cache_dir, skip_bad)
    classes, labels, index = _class_folders(root, rels)
    if index.size == len(rels):
        return ImageSet(images, labels, classes), rels  # the memory map itself, no copy
    return ImageSet(np.ascontiguousarray(images[index]), labels, classes), [rels[i] for i in index]


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100, official python-pickle layout
# ----------------------------------------------------------------------------------------------

_CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a pickle can run any code it names, and
    the CIFAR files need nothing else (numpy's array and scalar reconstructors, under their numpy 1
    or 2 module names, and codecs.encode, which Python 3 uses for bytes in protocol-2 pickles)."""

    _allowed = {
        "_reconstruct": np.ndarray.__reduce__(np.zeros(1))[0],
        "scalar": np.int64(0).__reduce__()[0],
    }

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _empty_placeholder
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in self._allowed:
            return self._allowed[name]
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")


def _empty_placeholder(subtype, shape, dtype):
    """numpy's array reconstructor, for the empty (0,) placeholder that numpy pickles: the data come
    next, checked against their declared shape. Any other shape would be allocated before any check."""
    if tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"refusing an array placeholder of shape {tuple(shape)} (numpy writes (0,))")
    return _ArrayUnpickler._allowed["_reconstruct"](subtype, shape, dtype)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, ValueError, pickle.UnpicklingError, AttributeError, IndexError, TypeError,
            MemoryError, OverflowError, RecursionError) as exc:  # a damaged or hostile file may declare anything
        raise UserError(f"{path}: not a readable CIFAR batch ({type(exc).__name__}: {exc}); re-download the dataset") from exc
    if not isinstance(batch, dict):
        raise UserError(f"{path}: not a CIFAR batch (a {type(batch).__name__}, expected a dict); re-download the dataset")
    return batch


def cifar_kind(folder: Path) -> str | None:
    """'cifar10', 'cifar100' or None, from the file names in ``folder``."""
    folder = Path(folder)
    if (folder / "batches.meta").exists() or (folder / "data_batch_1").exists():
        return "cifar10"
    if (folder / "meta").exists() and ((folder / "train").exists() or (folder / "test").exists()):
        return "cifar100"
    return None


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: expected a (N, 3072) uint8 'data' array, found a {found}; re-download the dataset")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _cifar_labels(batch: dict, key: bytes, n: int, num_classes: int, path: Path) -> np.ndarray:
    """The batch's labels as (N,) int64: one per image, each a class index (a short list would
    shift every later label onto the wrong image)."""
    raw = batch.get(key)
    labels = np.asarray(raw) if isinstance(raw, (list, tuple, np.ndarray)) else None
    if labels is None or labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise UserError(f"{path}: expected a list of integer labels under '{key.decode()}'; re-download the dataset")
    if labels.shape[0] != n:
        raise UserError(f"{path}: {n} images but {labels.shape[0]} labels under '{key.decode()}'; the file is damaged, "
                        "re-download the dataset")
    outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if outside.size:
        raise UserError(f"{path}: label {labels[outside[0]]} of image {outside[0]} is not a class index (0 to "
                        f"{num_classes - 1}; {outside.size} such label(s)); re-download the dataset")
    return labels.astype(np.int64)


def _cifar_classes(meta: dict, key: bytes, path: Path) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(c, (bytes, str)) for c in names):
        raise UserError(f"{path}: no class names under '{key.decode()}' (expected a list of names); "
                        "re-download the dataset")
    return [c.decode("utf-8", "replace") if isinstance(c, bytes) else c for c in names]


def load_cifar(folder: str | Path, coarse: bool = False) -> tuple[ImageSet, ImageSet]:
    """(train, test) from cifar-10-batches-py or cifar-100-python (``coarse``: the 20 superclasses)."""
    folder = _check_folder(folder)
    kind = cifar_kind(folder)
    if kind is None:
        raise UserError(f"{folder}: not a CIFAR folder (expected {', '.join(_CIFAR10_FILES)} or {', '.join(_CIFAR100_FILES)})")
    needed = _CIFAR10_FILES if kind == "cifar10" else _CIFAR100_FILES
    missing = [str(folder / f) for f in needed if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{kind} folder {folder} is missing: {', '.join(missing)}. Re-download it (python data.py download {kind} --root DIR).")
    if kind == "cifar10":
        classes = _cifar_classes(_unpickle(folder / "batches.meta"), b"label_names", folder / "batches.meta")
        parts = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        key = b"labels"
    else:
        names_key = b"coarse_label_names" if coarse else b"fine_label_names"
        classes = _cifar_classes(_unpickle(folder / "meta"), names_key, folder / "meta")
        parts = {"train": ["train"], "test": ["test"]}
        key = b"coarse_labels" if coarse else b"fine_labels"
    out = []
    for files in parts.values():
        images, labels = [], []
        for name in files:  # every batch is checked: one bad batch would shift or break them all
            batch = _unpickle(folder / name)
            images.append(_cifar_images(batch, folder / name))
            labels.append(_cifar_labels(batch, key, images[-1].shape[0], len(classes), folder / name))
        out.append(ImageSet(np.concatenate(images), np.concatenate(labels), classes))
    return out[0], out[1]


def _resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, h, 3) uint8 -> (N, size, size, 3) uint8, bilinear with antialiasing (torch)."""
    if images.shape[1] == size:
        return images
    out = np.empty((images.shape[0], size, size, 3), np.uint8)
    for lo in range(0, images.shape[0], 2048):
        x = torch.from_numpy(np.ascontiguousarray(images[lo : lo + 2048])).permute(0, 3, 1, 2).float()
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[lo : lo + 2048] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


# ----------------------------------------------------------------------------------------------
# Downloads
# ----------------------------------------------------------------------------------------------
#
# Checksums are the ones the publisher gives (CIFAR: the md5 sums on the dataset page; tf_flowers:
# the sha256 that the TensorFlow team, its publisher, records in TensorFlow Datasets). DTD, Food-101
# and the Microsoft cats-vs-dogs archive come with no published checksum, so none is verified
# (``note`` quotes a third-party record where one exists; it is not enforced).

DATASETS: dict[str, dict] = {
    "cifar10": {
        "classes": 10,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "sha256": None,
        "folder": "cifar-10-batches-py",
        "format": "cifar",
        "split": "official: 50,000 train / 10,000 test",
    },
    "cifar100": {
        "classes": 100,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "sha256": None,
        "folder": "cifar-100-python",
        "format": "cifar",
        "split": "official: 50,000 train / 10,000 test (fine labels; 'cifar100_coarse' for the 20 superclasses)",
    },
    "tf_flowers": {
        "classes": 5,
        "url": "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz",
        "md5": None,
        "sha256": "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c",
        "folder": "flower_photos",
        "format": "folder",
        "split": "none published: seeded stratified 20% test split (seed 0, fixed)",
    },
    "dtd": {
        "classes": 47,
        "url": "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
        "md5": None,
        "sha256": None,
        "folder": "dtd",
        "images": "images",
        "format": "dtd",
        "split": "official split 1: labels/train1.txt, val1.txt, test1.txt (1,880 each)",
        "note": "no publisher checksum; TensorFlow Datasets records sha256 e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
    },
    "food101": {
        "classes": 101,
        "url": "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
        "md5": None,
        "sha256": None,
        "folder": "food-101",
        "images": "images",
        "format": "food101",
        "split": "official: meta/train.txt (75,750) / meta/test.txt (25,250)",
        "note": "no publisher checksum; TensorFlow Datasets records sha256 d97d15e438b7f4498f96086a4f7e2fa42a32f2712e87d3295441b2b6314053a4",
    },
    "cats_vs_dogs": {
        "classes": 2,
        "url": "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip",
        "md5": None,
        "sha256": None,
        "folder": "PetImages",
        "format": "folder",
        "skip_bad": True,
        "split": "none published: seeded stratified 20% test split (seed 0, fixed)",
        "note": "no publisher checksum; the archive holds a few unreadable images, skipped with a warning",
    },
}
_ALIASES = {
    "cifar_10": "cifar10", "cifar_100": "cifar100", "cifar100_coarse": "cifar100", "flowers": "tf_flowers",
    "food_101": "food101", "catsvsdogs": "cats_vs_dogs", "cats_dogs": "cats_vs_dogs", "shapes_pool": POOL_NAME,
}


def _normalise(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    return key.replace("shapes_pool", POOL_NAME)


def known_names() -> list[str]:
    return [*EMBEDDED_TASKS, POOL_NAME, *DATASETS, "cifar100_coarse"]


def _is_coarse(name: str) -> bool:
    """'cifar100_coarse' (CIFAR-100's 20 superclasses) in any spelling _normalise accepts; its key is cifar100."""
    return name.strip().lower().replace("-", "_") == "cifar100_coarse"


def num_classes(name: str) -> int | None:
    """Classes of a labeled task named by an embedded or dataset name (with or without an
    @class+class selection), without loading it; None for a folder."""
    base, chosen = split_classes(name)
    if chosen is not None:
        return len(chosen)
    key = _normalise(base)
    if key in EMBEDDED_TASKS:
        return EMBEDDED_TASKS[key]
    if _is_coarse(base):
        return 20
    return DATASETS[key]["classes"] if key in DATASETS else None


def is_present(name: str, root: str | Path | None = None) -> bool:
    """Whether a task can load without a download: embedded, a folder that exists, or a named
    dataset already under ``root``."""
    base = split_classes(name)[0]
    key = _normalise(base)
    if key not in DATASETS:
        return key in EMBEDDED_TASKS or key == POOL_NAME or Path(base).expanduser().exists()
    try:
        _locate(key, root, fetch=False)
    except UserError:
        return False
    return True


def _mirror_url(url: str, mirror: str | None) -> str:
    """The URL to fetch: with a mirror (argument, else $SIMCLR_MIRROR), mirror + '/' + file name."""
    mirror = mirror or os.environ.get("SIMCLR_MIRROR") or None
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + Path(urllib.parse.urlparse(url).path).name


def _fetch(url: str, target: Path, md5: str | None, sha256: str | None, timeout: float, progress: bool | None) -> None:
    """Stream ``url`` into ``target`` with a progress bar, then check length and checksums."""
    hint = "Run the command again to start over, set SIMCLR_MIRROR / --mirror to use a mirror, or download and extract the archive yourself."
    hashes = {"md5": hashlib.md5(usedforsecurity=False) if md5 else None, "sha256": hashlib.sha256() if sha256 else None}
    got = 0
    expected = None
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "simclr-reference-data/1"})
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(target, "wb") as f:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(total=expected, desc=f"downloading {Path(urllib.parse.urlparse(url).path).name}", unit="B", unit_scale=True, disable=(not progress) if progress is not None else None) as bar:
                while True:
                    block = resp.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
                    for h in hashes.values():
                        if h is not None:
                            h.update(block)
                    got += len(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as exc:
        raise UserError(f"download of {url} failed: the server answered {exc.code} {exc.reason}. {hint}") from exc
    except urllib.error.URLError as exc:
        raise UserError(f"download of {url} failed: could not reach the server ({exc.reason}). {hint}") from exc
    except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException) as exc:
        raise UserError(f"download of {url} failed after {got} bytes: the connection dropped or timed out ({type(exc).__name__}). {hint}") from exc
    if expected is not None and got != expected:
        raise UserError(f"download of {url} stopped after {got} of {expected} bytes (connection dropped). {hint}")
    for kind, want in (("md5", md5), ("sha256", sha256)):
        if want and hashes[kind].hexdigest() != want.lower():
            raise UserError(
                f"checksum mismatch for {url}: expected {kind} {want}, got {hashes[kind].hexdigest()}. "
                f"The file is corrupt or not the publisher's; nothing was kept. {hint}"
            )


def _extract(archive: Path, into: Path) -> None:
    """Unpack a tar (any compression) or zip archive into ``into``, refusing paths that leave it."""
    into.mkdir()
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                try:
                    tar.extractall(into, filter="data")
                except tarfile.FilterError as exc:  # OutsideDestinationError, AbsoluteLinkError and their kin
                    raise UserError(f"{archive}: unsafe path in archive: {exc.tarinfo.name}") from None
            else:  # Python < 3.11.4: check names ourselves
                for m in tar.getmembers():
                    if m.name.startswith("/") or ".." in Path(m.name).parts or m.issym() or m.islnk():
                        raise UserError(f"{archive}: unsafe path in archive: {m.name}")
                tar.extractall(into)
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise UserError(f"{archive}: unsafe path in archive: {name}")
            zf.extractall(into)
    else:
        raise UserError(f"{archive}: the download is neither a tar nor a zip archive; check the URL or mirror")


def download_and_extract(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    md5: str | None = None,
    mirror: str | None = None,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> Path:
    """Download an archive and extract it so that ``dest`` holds its contents; returns ``dest``.

    All work happens in a hidden temporary folder beside ``dest`` (same file system): stream to a
    file, verify the size and the checksums given, extract, then one os.replace puts the folder in
    place. ``dest`` therefore either does not exist or is complete; an interrupted or failed run
    leaves only the temporary folder, which the next run (or the failure handler) removes, so it
    starts clean. An existing ``dest`` is returned untouched. Two concurrent downloads to the same
    ``dest`` are not supported. ``mirror`` (or $SIMCLR_MIRROR): fetch mirror/<file name> instead.
    """
    dest = Path(dest).expanduser().absolute()
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        archive = work / "archive"
        _fetch(_mirror_url(url, mirror), archive, md5, sha256, timeout, progress)
        _extract(archive, work / "content")
        archive.unlink()
        os.replace(work / "content", dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def download(name: str, root: str | Path | None = None, mirror: str | None = None, progress: bool | None = None) -> Path:
    """Download a dataset of DATASETS into root/<name>/ (root: default_data_root()); returns the
    folder that holds its files (e.g. root/cifar10/cifar-10-batches-py)."""
    key = _normalise(name)
    if key not in DATASETS:
        raise UserError(f"no download for {name!r}; downloadable: {', '.join(DATASETS)}")
    spec = DATASETS[key]
    root = Path(root).expanduser() if root is not None else default_data_root()
    dest = download_and_extract(spec["url"], root / key, sha256=spec["sha256"], md5=spec["md5"], mirror=mirror, progress=progress)
    folder = dest / spec["folder"]
    if not folder.is_dir():
        raise UserError(f"{dest}: the archive did not contain {spec['folder']}/; delete {dest} and check the URL or mirror")
    return folder


def _locate(key: str, root: str | Path | None, fetch: bool) -> Path:
    """The folder of a named dataset: root/<name>/<folder>, root/<folder>, or root itself."""
    spec = DATASETS[key]
    base = Path(root).expanduser() if root is not None else default_data_root()
    for cand in (base / key / spec["folder"], base / spec["folder"], base):
        if cand.is_dir() and cand.name == spec["folder"]:
            return cand.resolve()
    if fetch:
        return download(key, base)
    raise UserError(
        f"{key} not found under {base} (looked for {base / key / spec['folder']} and {base / spec['folder']}). "
        f"Download it with `python data.py download {key} --root {base}` or pass download=True."
    )


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


def _rel_index(rels: list[str], strip_ext: bool) -> dict[str, int]:
    return {(os.path.splitext(r)[0] if strip_ext else r): i for i, r in enumerate(rels)}


def _listed_split(folder: Path, list_file: Path, lookup: dict[str, int], strip_ext: bool) -> np.ndarray:
    if not list_file.is_file():
        raise UserError(f"{folder}: split file {list_file} is missing; re-download the dataset")
    keys = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
    keys = [os.path.splitext(k)[0] if strip_ext else k for k in keys]
    return np.array(sorted(lookup[k] for k in keys if k in lookup), np.int64)


def _folder_task(label: str, folder: Path, image_size, val_fraction, seed, n_train, n_test, cache_dir, skip_bad) -> TaskData:
    """A user's folder: CIFAR pickles, root/{train,test[,val]}/class/img, or root/class/img."""
    kind = cifar_kind(folder)
    if kind is not None:
        train, test = load_cifar(folder)
        train.images, test.images = _resize_square(train.images, image_size), _resize_square(test.images, image_size)
        return _finish(label, train, None, test, train.classes, val_fraction, seed, n_train, n_test)
    sub = {d.name.lower(): d for d in folder.iterdir() if d.is_dir()}
    if "train" in sub and "test" in sub:
        parts = {"train": sub["train"], "test": sub["test"]}
        for v in ("val", "valid", "validation"):
            if v in sub:
                parts["val"] = sub[v]
        loaded = {k: _labeled_folder(p, image_size, cache_dir, skip_bad)[0] for k, p in parts.items()}
        classes = sorted(set().union(*(s.classes for s in loaded.values())))
        for s in loaded.values():  # class indices over the union of the splits' class folders
            remap = np.array([classes.index(c) for c in s.classes], np.int64)
            s.labels, s.classes = remap[s.labels], classes
        return _finish(label, loaded["train"], loaded.get("val"), loaded["test"], classes, val_fraction, seed, n_train, n_test)
    whole, _ = _labeled_folder(folder, image_size, cache_dir, skip_bad)
    rest, test_idx = stratified_split(whole.labels, int(round(_TEST_FRACTION * len(whole))), _TEST_SPLIT_SEED)
    return _finish(label, whole.subset(rest), None, whole.subset(test_idx), whole.classes, val_fraction, seed, n_train, n_test)


def _named_task(key, coarse, image_size, root, val_fraction, seed, n_train, n_test, fetch, cache_dir, skip_bad) -> TaskData:
    spec = DATASETS[key]
    folder = _locate(key, root, fetch)
    label = key + ("_coarse" if coarse else "")
    skip_bad = skip_bad or spec.get("skip_bad", False)
    if spec["format"] == "cifar":
        train, test = load_cifar(folder, coarse=coarse)
        train.images, test.images = _resize_square(train.images, image_size), _resize_square(test.images, image_size)
        return _finish(label, train, None, test, train.classes, val_fraction, seed, n_train, n_test)
    if spec["format"] == "folder":
        return _folder_task(label, folder, image_size, val_fraction, seed, n_train, n_test, cache_dir, skip_bad)
    whole, rels = _labeled_folder(folder / spec["images"], image_size, cache_dir, skip_bad)
    if spec["format"] == "dtd":
        lookup = _rel_index(rels, strip_ext=False)
        idx = {s: _listed_split(folder, folder / "labels" / f"{s}1.txt", lookup, False) for s in ("train", "val", "test")}
        return _finish(label, whole.subset(idx["train"]), whole.subset(idx["val"]), whole.subset(idx["test"]), whole.classes, val_fraction, seed, n_train, n_test)
    lookup = _rel_index(rels, strip_ext=True)  # food101: meta lists "class/id" without extension
    idx = {s: _listed_split(folder, folder / "meta" / f"{s}.txt", lookup, True) for s in ("train", "test")}
    return _finish(label, whole.subset(idx["train"]), None, whole.subset(idx["test"]), whole.classes, val_fraction, seed, n_train, n_test)


def _unknown(name: str) -> UserError:
    return UserError(f"unknown dataset {name!r} (and no such folder). Known names: {', '.join(known_names())}; or pass a folder path.")


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith((".", "~")) or Path(name).exists()


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
    key = _normalise(name)
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
        ``root``, default default_data_root(), downloaded there when ``download``), or a folder:
        CIFAR pickles, root/class/img, or root/{train,test[,val]}/class/img. Any of them followed by
        @class+class (``cifar10@cat+dog``) is a task of those classes only, labelled 0.. in the order
        given (split_classes); n_train and n_test then count the selected classes' images.
    image_size: working size. Embedded and CIFAR images come at exactly this size; decoded folders
        at cache_resolution(image_size) (a margin for crops, see the image-folder section).
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
    key = _normalise(name)
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
    if key in DATASETS:
        return _named_task(key, _is_coarse(name), image_size, root, val_fraction, seed, n_train, n_test, download, cache_dir, skip_bad)
    if not _looks_like_path(name):
        raise _unknown(name)
    folder = _check_folder(Path(name))
    return _folder_task(folder.name, folder, image_size, val_fraction, seed, n_train, n_test, cache_dir, skip_bad)


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
    key = _normalise(name)
    if key == POOL_NAME:
        out = ImageSet(*shapes.generate(POOL_NAME, int(n if n is not None else DEFAULT_POOL_SIZE), "pool", image_size, seed))
        return out
    if key in EMBEDDED_TASKS:
        m = int(n if n is not None else EMBEDDED_SIZES[key][0])
        return ImageSet(shapes.generate(key, m, "train", image_size, seed)[0], None, [])
    if chosen is not None:  # one class is fine here: no classifier is trained on these
        whole = load_task(base, image_size, root, 0.0, seed, None, None, download, cache_dir, skip_bad)
        images = _select(name, chosen, whole)[0].images
    elif key in DATASETS:
        task = load_task(name, image_size, root, 0.0, seed, None, None, download, cache_dir, skip_bad)
        images = task.train.images
    elif _looks_like_path(name):
        folder = _check_folder(Path(name))
        if cifar_kind(folder) is not None:
            images = _resize_square(load_cifar(folder)[0].images, image_size)
        else:
            images, _ = load_folder_images(folder, image_size, cache_dir, skip_bad)
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

    @property
    def resident(self) -> bool:
        """Whether the whole set lives on the device."""
        return self._resident is not None

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
    key = _normalise(str(name))
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


def _has_classes(folder: Path) -> bool:
    return folder.is_dir() and any(d.is_dir() and not _is_hidden(d.name) for d in folder.iterdir())


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
    key = _normalise(name)
    if key == POOL_NAME:
        return True
    if key in DATASETS or key in EMBEDDED_TASKS or not _looks_like_path(name):
        return False
    folder = Path(name).expanduser()
    return folder.is_dir() and cifar_kind(folder) is None and not _has_classes(folder)


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
    p.add_argument("--size", type=options.bounded(int, options.Range(8), "size"), default=32, help="image size")
    p.add_argument("--per-class", type=options.bounded(int, options.AT_LEAST_1, "per-class"), default=8, help="images per class (row)")
    p.add_argument("--max-classes", type=options.bounded(int, options.AT_LEAST_1, "max-classes"), default=20, help="rows to show at most")
    p.add_argument("--seed", type=options.bounded(int, options.NON_NEGATIVE, "seed"), default=0, help="random seed")
    p.add_argument("--root", default=None, help="data root for named datasets; None: $SIMCLR_DATA, else ~/.local/share/simclr")
    p.add_argument("--cache-dir", default=None, help="decode cache; None: $SIMCLR_CACHE, else ~/.cache/simclr")
    p = sub.add_parser("info", help="print splits, classes and channel statistics", formatter_class=HelpFormatter)
    p.add_argument("name", help="dataset name or folder")
    p.add_argument("--size", type=options.bounded(int, options.Range(8), "size"), default=32, help="image size")
    p.add_argument("--root", default=None, help="data root for named datasets")
    p.add_argument("--cache-dir", default=None, help="decode cache")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images with a warning")
    p.add_argument("--download", action="store_true", help="download a named dataset if missing")
    p = sub.add_parser("download", help="download and extract a named dataset", formatter_class=HelpFormatter)
    p.add_argument("name", choices=list(DATASETS))
    p.add_argument("--root", default=None, help="data root; None: $SIMCLR_DATA, else ~/.local/share/simclr")
    p.add_argument("--mirror", default=None, help="base URL serving the archives by file name; None: $SIMCLR_MIRROR, else the publisher")
    p = sub.add_parser("bench", help="generator speed on one CPU core", formatter_class=HelpFormatter)
    p.add_argument("--n", type=options.bounded(int, options.AT_LEAST_1, "n"), default=20000, help="images to generate")
    p.add_argument("--size", type=options.bounded(int, options.Range(8), "size"), default=32, help="image size")
    p.add_argument("--name", default=POOL_NAME, help="embedded dataset to render")
    return parser


def run_command(args: argparse.Namespace) -> None:
    if args.command == "grid":
        out = save_grid(args.name, args.out, args.size, args.per_class, args.max_classes, args.seed, args.root,
                        args.cache_dir)
        print(f"wrote {out}")
    elif args.command == "download":
        print(f"ready: {download(args.name, args.root, args.mirror)}")
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
