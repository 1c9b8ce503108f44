"""Where the images come from: image folders decoded once into a cache, CIFAR pickles, downloads.

1. Image folders (root/class_name/image.ext, root/{train,test[,val]}/class_name/image.ext, or a flat
   folder of unlabeled photos), decoded once in parallel processes into a uint8 .npy memory map in a
   cache outside the user's folder. A lock per cache entry lets runs that load the same folder at
   once share one decode, and the free space is checked before the memory map is written.
2. CIFAR-10 / CIFAR-100 in the official python-pickle layout, read by an unpickler that builds
   arrays and nothing else.
3. Downloads of the named datasets (DATASETS) from their publishers, checked against the publisher's
   checksums where there are any, and extracted so that a dataset's folder is complete or absent.

Readers return plain arrays: images (N, H, W, 3) uint8, labels (N,) int64 and class names, as
shapes.generate does. data.py, the data core, wraps them into its containers and carves the splits a
source lacks; use it (``data.load_task``, ``data.load_unlabeled``) rather than this file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import math
import multiprocessing
import multiprocessing.connection
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
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

import checkpoints  # for atomic_write: a cache manifest is never left half-written
from options import UserError
from shapes import POOL_NAME

try:
    import fcntl  # POSIX file locks for the decode cache; Windows has none (see _entry_lock)
except ImportError:
    fcntl = None

# A labeled split as the readers return it: images (N, H, W, 3) uint8, labels (N,) int64, class
# names (what shapes.generate returns and data.ImageSet takes).
Labeled = tuple[np.ndarray, np.ndarray, list[str]]


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


def check_folder(root: str | Path) -> Path:
    """``root`` resolved, or a UserError saying that it is missing or a file."""
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


# The signals a decode worker must not handle as its parent does (see _worker_signals).
_WORKER_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _worker_signals() -> None:
    """First thing in each decode worker. Ctrl-C (sent to the whole process group) is left to the
    parent, which ends the workers, instead of each printing a KeyboardInterrupt traceback. SIGTERM,
    which ends them, gets the default action: the kernel ends a worker wherever it is, where a handler
    inherited from the parent (options.main's) would wait for Python code that a worker asleep in a
    system call may never run, and the parent would wait on the worker forever. Both signals have been
    blocked since the fork (_DecodeWorkers.start); one that came meanwhile acts now."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)


def _pool_context():
    # fork on Linux: workers start instantly and only use Pillow / numpy; elsewhere spawn.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back in this thread and in the processes it starts meanwhile, which
    inherit its signal mask; one that arrives is delivered when the mask is restored."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no masks, and spawned workers start afresh
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _WorkerLost(Exception):
    """A decode worker ended in the middle of the work (a signal, the out-of-memory killer)."""


def _decode_worker(function: Callable, tasks: Connection, results: Connection) -> None:
    """Body of a decode worker: function(task) for each task that comes, until None comes."""
    _worker_signals()
    try:
        for task in iter(tasks.recv, None):
            results.send(function(task))
    except (EOFError, OSError):  # a pipe closed: the parent is gone (killed), nobody waits for the rest
        pass


class _DecodeWorkers:
    """Worker processes, each with a task pipe and a result pipe of its own. multiprocessing.Pool's
    workers share one task queue and its lock: a worker killed while it held the lock (a SIGTERM to
    the whole process group, the out-of-memory killer) left Pool.terminate waiting on it forever. Here
    nothing is shared, a worker's death is seen at once (its sentinel), and ending never waits on a
    worker: close() lets idle workers exit, terminate() ends them with SIGTERM's default action."""

    def __init__(self) -> None:
        self.workers: list = []  # (process, task pipe's sending end, result pipe's receiving end)

    def start(self, n_workers: int, function: Callable) -> None:
        context = _pool_context()
        with _signals_blocked():  # so no worker runs a moment with the parent's handlers (_worker_signals)
            for _ in range(n_workers):
                task_out, task_in = context.Pipe(duplex=False)
                result_out, result_in = context.Pipe(duplex=False)
                process = context.Process(target=_decode_worker, args=(function, task_out, result_in), daemon=True)
                process.start()
                self.workers.append((process, task_in, result_out))
                task_out.close()  # the worker holds the only other ends now: its death closes its pipes
                result_in.close()

    def imap(self, tasks: list) -> Iterator:
        """function(task) for each task, in order. An idle worker takes the next task, at most two per
        worker ahead of the result awaited, so that the results held back stay few."""
        idle, busy, done, sent = list(range(len(self.workers))), {}, {}, 0
        for i in range(len(tasks)):
            while i not in done:
                while idle and sent < min(len(tasks), i + 2 * len(self.workers)):
                    k = idle.pop()
                    self._send(k, tasks[sent])
                    busy[k], sent = sent, sent + 1
                k, result = self._receive(list(busy))
                done[busy.pop(k)] = result
                idle.append(k)
            yield done.pop(i)

    def _send(self, k: int, task) -> None:
        try:
            self.workers[k][1].send(task)
        except OSError:  # the worker's end is closed: it ended
            raise self._lost(k) from None

    def _receive(self, busy: list[int]) -> tuple[int, object]:
        """(worker, result) of the next busy worker to finish; _WorkerLost as soon as any worker ends."""
        waiting = {self.workers[k][2]: (k, "result") for k in busy}
        waiting.update({process.sentinel: (k, "ended") for k, (process, _, _) in enumerate(self.workers)})
        k, what = waiting[multiprocessing.connection.wait(list(waiting))[0]]  # no timeout: never empty
        if what == "ended":  # no worker ends by itself before close()
            raise self._lost(k)
        try:
            return k, self.workers[k][2].recv()
        except (EOFError, OSError):  # it ended before or while sending
            raise self._lost(k) from None

    def _lost(self, k: int) -> _WorkerLost:
        process = self.workers[k][0]
        process.join()
        code = process.exitcode
        how = f"by {signal.Signals(-code).name}" if code < 0 else f"with exit status {code}"
        return _WorkerLost(f"decode worker {process.pid} was ended {how}")

    def close(self) -> None:
        """Let every worker finish and exit (each is idle once imap has returned all results)."""
        for _, task_in, _ in self.workers:
            with contextlib.suppress(OSError):  # one that ended meanwhile needs no word
                task_in.send(None)
        self._join()

    def terminate(self) -> None:
        """End every worker now, wherever it is."""
        for process, _, _ in self.workers:
            if process.exitcode is None:
                process.terminate()
        self._join()

    def _join(self) -> None:
        for process, task_in, result_out in self.workers:
            process.join()
            task_in.close()
            result_out.close()


@contextlib.contextmanager
def _decode_pool(n_workers: int, function: Callable = _decode_chunk) -> Iterator[_DecodeWorkers]:
    """``n_workers`` processes that run ``function`` on tasks (imap). When the body ends normally the
    workers finish and exit; an error or interrupt ends them at once."""
    pool, finished = _DecodeWorkers(), False
    try:
        pool.start(n_workers, function)
        yield pool
        pool.close()
        finished = True
    finally:
        if not finished:
            pool.terminate()


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
    root = check_folder(root)
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
            results = stack.enter_context(_decode_pool(n_workers)).imap(tasks)
        else:
            results = map(_decode_chunk, tasks)
        try:
            for (_, chunk, _), (arr, ok, chunk_bad) in zip(tasks, results):
                good = np.flatnonzero(ok)
                out[len(kept) : len(kept) + good.size] = arr[good]
                kept.extend(chunk[i] for i in good)
                bad.extend(chunk_bad)
                bar.update(len(chunk))
        except _WorkerLost as exc:
            raise UserError(f"decoding the images under {root} stopped: {exc}. Nothing was kept. Run the command "
                            "again; if it happens again, the system may be short of memory (it ends processes "
                            "then), or an image may crash the decoder.") from None
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


def _labeled_folder(root: Path, image_size: int, cache_dir, skip_bad: bool) -> tuple[Labeled, list[str]]:
    """root/class/img as one labeled split, and the files' paths relative to root."""
    images, rels = load_folder_images(root, image_size, cache_dir, skip_bad)
    classes, labels, index = _class_folders(root, rels)
    if index.size == len(rels):
        return (images, labels, classes), rels  # the memory map itself, no copy
    return (np.ascontiguousarray(images[index]), labels, classes), [rels[i] for i in index]


def has_class_folders(folder: Path) -> bool:
    """Whether ``folder`` holds a (visible) folder, as root/class_name/image.jpg does."""
    return folder.is_dir() and any(d.is_dir() and not _is_hidden(d.name) for d in folder.iterdir())


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


def load_cifar(folder: str | Path, coarse: bool = False) -> tuple[Labeled, Labeled]:
    """(train, test) from cifar-10-batches-py or cifar-100-python (``coarse``: the 20 superclasses),
    each (images (N, 32, 32, 3) uint8, labels (N,) int64, class names)."""
    folder = check_folder(folder)
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
        out.append((np.concatenate(images), np.concatenate(labels), classes))
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


def normalise(name: str) -> str:
    """The key of a dataset name: lower case, '-' read as '_', aliases resolved (cifar-10 -> cifar10)."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    return key.replace("shapes_pool", POOL_NAME)


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
    key = normalise(name)
    if key not in DATASETS:
        raise UserError(f"no download for {name!r}; downloadable: {', '.join(DATASETS)}")
    spec = DATASETS[key]
    root = Path(root).expanduser() if root is not None else default_data_root()
    dest = download_and_extract(spec["url"], root / key, sha256=spec["sha256"], md5=spec["md5"], mirror=mirror, progress=progress)
    folder = dest / spec["folder"]
    if not folder.is_dir():
        raise UserError(f"{dest}: the archive did not contain {spec['folder']}/; delete {dest} and check the URL or mirror")
    return folder


def locate(key: str, root: str | Path | None, fetch: bool) -> Path:
    """The folder of a named dataset: root/<name>/<folder>, root/<folder>, or root itself (downloaded
    there when ``fetch``; else a UserError that says how to download it)."""
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
# The labeled splits a source publishes (data.py carves what it lacks: test, then val)
# ----------------------------------------------------------------------------------------------


def _rel_index(rels: list[str], strip_ext: bool) -> dict[str, int]:
    return {(os.path.splitext(r)[0] if strip_ext else r): i for i, r in enumerate(rels)}


def _listed_split(folder: Path, list_file: Path, lookup: dict[str, int], strip_ext: bool) -> np.ndarray:
    """Sorted indices of the images that a split file (one relative path a line) lists."""
    if not list_file.is_file():
        raise UserError(f"{folder}: split file {list_file} is missing; re-download the dataset")
    keys = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
    keys = [os.path.splitext(k)[0] if strip_ext else k for k in keys]
    return np.array(sorted(lookup[k] for k in keys if k in lookup), np.int64)


def _cifar_splits(folder: Path, coarse: bool, image_size: int) -> dict[str, Labeled]:
    train, test = load_cifar(folder, coarse)
    return {split: (_resize_square(images, image_size), labels, classes)
            for split, (images, labels, classes) in (("train", train), ("test", test))}


def folder_splits(folder: Path, image_size: int, cache_dir: str | Path | None, skip_bad: bool) -> dict[str, Labeled]:
    """The splits of a user's folder (as check_folder returns it): CIFAR pickles (train, test),
    root/{train,test[,val]}/class/img (val where there is one), or root/class/img (train only)."""
    if cifar_kind(folder) is not None:
        return _cifar_splits(folder, False, image_size)
    sub = {d.name.lower(): d for d in folder.iterdir() if d.is_dir()}
    if "train" in sub and "test" in sub:
        parts = {"train": sub["train"], "test": sub["test"]}
        for v in ("val", "valid", "validation"):
            if v in sub:
                parts["val"] = sub[v]
        loaded = {k: _labeled_folder(p, image_size, cache_dir, skip_bad)[0] for k, p in parts.items()}
        classes = sorted(set().union(*(own for _, _, own in loaded.values())))
        out = {}
        for k, (images, labels, own) in loaded.items():  # class indices over the union of the splits' class folders
            out[k] = (images, np.array([classes.index(c) for c in own], np.int64)[labels], classes)
        return out
    return {"train": _labeled_folder(folder, image_size, cache_dir, skip_bad)[0]}


def dataset_splits(key: str, coarse: bool, image_size: int, root: str | Path | None, fetch: bool,
                   cache_dir: str | Path | None, skip_bad: bool) -> dict[str, Labeled]:
    """The published splits of DATASETS[key], found under ``root`` (downloaded there when ``fetch``):
    CIFAR's and Food-101's train and test, DTD's train, val and test (split 1), train only for the rest."""
    spec = DATASETS[key]
    folder = locate(key, root, fetch)
    skip_bad = skip_bad or spec.get("skip_bad", False)
    if spec["format"] == "cifar":
        return _cifar_splits(folder, coarse, image_size)
    if spec["format"] == "folder":
        return folder_splits(folder, image_size, cache_dir, skip_bad)
    (images, labels, classes), rels = _labeled_folder(folder / spec["images"], image_size, cache_dir, skip_bad)
    if spec["format"] == "dtd":
        lists, strip_ext = {s: folder / "labels" / f"{s}1.txt" for s in ("train", "val", "test")}, False
    else:  # food101: meta lists "class/id" without extension
        lists, strip_ext = {s: folder / "meta" / f"{s}.txt" for s in ("train", "test")}, True
    lookup = _rel_index(rels, strip_ext)
    index = {s: _listed_split(folder, list_file, lookup, strip_ext) for s, list_file in lists.items()}
    return {s: (np.ascontiguousarray(images[i]), labels[i], classes) for s, i in index.items()}


def unlabeled_folder(folder: str | Path, image_size: int, cache_dir: str | Path | None, skip_bad: bool) -> np.ndarray:
    """The images of a folder, without labels: CIFAR's train split at ``image_size``, else every
    image file under it, recursively (the cache's read-only memory map)."""
    folder = check_folder(folder)
    if cifar_kind(folder) is not None:
        return _resize_square(load_cifar(folder)[0][0], image_size)
    return load_folder_images(folder, image_size, cache_dir, skip_bad)[0]
