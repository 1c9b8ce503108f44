"""The shared engine of every stage: devices and precision, run folders and atomic checkpoints, the
optimiser by name (LARS and the warm-up + cosine schedule live in optim.py), the training loop,
models rebuilt from checkpoints, evaluation, and the command-line pieces every script uses.

simclr.py, distill.py and transfer.py import this file; none of them imports another stage's file
for plumbing. Nothing here is specific to contrastive learning: read simclr.py first.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import time
import typing
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import augment
import models
from optim import LARS, learning_rate, parameter_groups, scaled_lr  # noqa: F401 (train.LARS etc.)

try:
    import fcntl  # flock: one writer per run folder (Linux, macOS); Windows has none
except ImportError:  # pragma: no cover
    fcntl = None

if TYPE_CHECKING:  # data.py imports this file (for UserError), so only its types are named here
    from data import BatchLoader, ImageSet, TaskData


class UserError(Exception):
    """A problem with the user's input (a path, a name, a setting); the message says what to do.

    Command lines print the message and exit with status 2, without a traceback.
    """


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help of every command line of the project: each option with its default, said once."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


CHECKPOINT_FORMAT = 1  # written into every checkpoint; load_checkpoint refuses a newer one

# ----------------------------------------------------------------------------------------------
# Devices, distributed set-up, precision


def select_device(name: str = "auto") -> torch.device:
    """Resolve 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' to a device that exists here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"Unknown device '{name}'. Use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Device '{name}' was requested but this machine has no usable CUDA GPU "
                        "(torch.cuda.is_available() is False). Use --device cpu or --device auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"Device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"Device '{name}' was requested but MPS is not available here. Use --device cpu.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"Unsupported device '{name}'. Use auto, cpu, cuda, cuda:N or mps.")
    return device


@dataclass
class Distributed:
    """Where this process sits in a torchrun launch (rank 0 of 1 when launched alone)."""
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group torchrun describes in the environment; a single process needs none.

    NCCL on CUDA, gloo on CPU. Each rank then owns one GPU (LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Distributed(dist.get_rank(), dist.get_world_size())


PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs that compute bfloat16 in hardware (Intel AMX or AVX512-BF16), where bf16
    autocast runs a small ResNet about 3x faster; elsewhere bf16 is emulated and slower than fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA and on CPUs with native bf16, 'fp32' elsewhere (MPS included)."""
    if precision not in PRECISIONS:
        raise UserError(f"Unknown precision '{precision}'. Use one of: {', '.join(PRECISIONS)}.")
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast (no loss scaling needed, unlike fp16) or plain fp32, as `resolve_precision` says.
    Convolutions and matrix products run in bf16; losses.py computes its softmaxes in fp32."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


COMPILE_CHOICES = ("auto", "on", "off")
# torch.compile pays back its cost (30-60 s on 2 CPU cores per network and batch shape, then shared by
# every later run of that network in the process) after about this many training images at ~1.4x
# the eager speed on CPUs (README, Speed); 'auto' compiles runs at least this long.
COMPILE_MIN_IMAGES = 200_000


def resolve_compile(setting: str, device: torch.device, images: int) -> bool:
    """Whether to torch.compile a training step that will see `images` images: 'on', 'off', or
    'auto', which is on for CPU runs of at least COMPILE_MIN_IMAGES images where torch.compile's
    CPU backend has its C++ compiler (measured on CPU only: CUDA and MPS stay eager under auto)."""
    if setting not in COMPILE_CHOICES:
        raise UserError(f"Unknown --compile '{setting}'. Use one of: {', '.join(COMPILE_CHOICES)}.")
    if setting != "auto":
        return setting == "on"
    return device.type == "cpu" and images >= COMPILE_MIN_IMAGES and _cpu_compiler() is not None


@functools.lru_cache(maxsize=None)
def _cpu_compiler() -> str | None:
    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++"))), None)


def compiled(model: nn.Module, enabled: bool = True) -> Callable[..., Any]:
    """torch.compile(model) for the training step, or `model` itself. Compiling happens at the first
    call; if it fails there (no working compiler, an unsupported operator), a warning says so and
    the eager model runs instead, so a missing compiler costs speed, never the run."""
    if not enabled:
        return model
    fast = torch.compile(model)
    chosen = [fast]

    def step(*args, **kwargs):
        # One memory layout for every input (a flipped or un-augmented batch keeps the loader's
        # channels-last strides): a new layout would compile the network once more.
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        try:
            return chosen[0](*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:
            if chosen[0] is model:
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {_first_line(e)[:300]}); running eagerly.",
                          stacklevel=2)
            chosen[0] = model
            return model(*args, **kwargs)
    step._orig_mod = model  # unwrap() finds the module behind it
    return step


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ----------------------------------------------------------------------------------------------
# Run folders and atomic checkpoints


def atomic_write(path: str | os.PathLike, write: Callable[[object], None], mode: str = "wb", *,
                 raw_errors: bool = False) -> None:
    """write(file) into a temporary file in the same folder, fsync, then rename over `path`
    (raw_errors: an OSError reaches the caller as it is, for callers with their own message).

    A crash at any moment leaves either the previous file or the new one, never half of one:
    os.replace is atomic on POSIX and Windows when source and target share a file system."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the user's group
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError) and not raw_errors:  # a full disk or a vanished folder: the user's to fix
            kept = f" The previous '{path.name}' is unchanged." if path.exists() else ""
            raise UserError(f"Could not write '{path}': {write_error_cause(path, e)}.{kept}") from e
        raise


def write_error_cause(path: str | os.PathLike, error: OSError) -> str:
    """Why writing `path` failed, and what to do, in the words of the actual cause."""
    path = Path(path)
    if error.errno == errno.ENOENT and not path.parent.is_dir():
        return (f"its folder '{path.parent}' no longer exists: something removed it while this run was writing "
                "(another process, or a clean-up). Nothing of this run is left there; start it again")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{error.strerror}. Free some space or choose another --out, then run again (with --resume to "
                "continue a run)")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{error.strerror}. Choose an --out where you may write"
    return f"{error.strerror or error}. Check the folder, then run again (with --resume to continue a run)"


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save(obj) to `path` atomically (see atomic_write); an OSError becomes a UserError."""
    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write `text` to `path` atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write(text), "w")


def load_tensors_only(path: str | os.PathLike, map_location: str | torch.device = "cpu", what: str = "Checkpoint ",
                      hint: str = "It may be truncated or not a PyTorch checkpoint; use an earlier copy or rerun."
                      ) -> object:
    """torch.load(path, weights_only=True): plain types and tensors only, so a downloaded file cannot
    run code. A file holding other objects, or a damaged one, gives a UserError that says which.

    what: how the message names the file ("Checkpoint '...'"); hint: the advice for a damaged file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise UserError(f"{what}'{path}' could not be read (UnpicklingError: {_first_line(e)}). {hint}") from None
        # torch's own text explains how to load such a file anyway; the user needs the opposite advice.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        named = f" (it names {found.group(1)})" if found else ""
        raise UserError(f"{what}'{path}' holds objects other than tensors and plain values{named}, so it was not "
                        "loaded, for safety: unpickling them could run code. Never pass weights_only=False to "
                        "torch.load for a file you do not trust. Checkpoints of this project and torchvision-layout "
                        "state dicts hold tensors only.") from None
    except Exception as e:  # torch raises several types for truncated zip archives
        raise UserError(f"{what}'{path}' could not be read ({type(e).__name__}: {_first_line(e)}). {hint}") from None


def _first_line(error: Exception) -> str:
    """The first line of an exception's text, whole (torch's longer explanations span many lines)."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else ""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by this project with weights_only=True (plain types and tensors
    only, so a downloaded file cannot run code). Missing or damaged files give a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint '{path}' does not exist (or is not a file). Pass the checkpoint.pt "
                        "of a finished or interrupted run.")
    ckpt = load_tensors_only(path, map_location)
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"'{path}' is not a checkpoint of this project (no 'kind' entry). For a plain "
                        "torchvision-layout state dict use transfer.py --encoder-weights.")
    if ckpt.get("format", CHECKPOINT_FORMAT) > CHECKPOINT_FORMAT:
        raise UserError(f"'{path}' was written in checkpoint format {ckpt['format']} by a newer version of this "
                        f"project; this code reads format {CHECKPOINT_FORMAT}. Update the code to load it.")
    return ckpt


# Settings a resumed run may change: where and how fast it runs, and how often it reports. Every
# other setting changes what the run is (README, "Resuming").
RESUME_MAY_DIFFER = frozenset({"device", "device_resolved", "precision", "precision_resolved", "compile",
                               "log_every", "knn_every", "checkpoint_every", "root", "cache_dir", "skip_bad",
                               "torch", "release"})


# One writer per run folder: the process that writes a run folder holds an flock on its run.lock for
# as long as it runs, and a folder inside a locked one counts as locked. The kernel drops the lock
# when the process ends, however it ends, so a lock file left by a dead process is simply taken over;
# the file's text only says who holds it. A second process is refused before it touches anything.
LOCK_FILE = "run.lock"
_THIS_PROCESS = "this process"


def _host() -> str:
    return os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")


def _lock_holder(lock: Path) -> str | None:
    """Who holds `lock`: None when nobody does (no such file, a dead process's file, or a file system
    without locks), _THIS_PROCESS, or 'process 123 on host (started ...: python ...)'."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:  # flock locks belong to an open file: this process's own lock looks taken too
        try:
            owner = json.loads(os.pread(fd, 65536, 0))
        except (OSError, ValueError):  # being written this very moment
            return "another process"
        if owner.get("pid") == os.getpid() and owner.get("host") == _host():
            return _THIS_PROCESS
        return f"process {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')}: {owner.get('command')})"
    except OSError:
        return None
    finally:
        os.close(fd)


def check_unlocked(folder: Path) -> bool:
    """UserError naming the other process when one writes `folder` or a run folder containing it;
    else whether this process already holds such a lock."""
    if fcntl is None:
        return False
    for candidate in [folder, *folder.parents]:
        holder = _lock_holder(candidate / LOCK_FILE)
        if holder == _THIS_PROCESS:
            return True
        if holder is not None:
            inside = "" if candidate == folder else f", inside the run folder '{candidate}',"
            raise UserError(f"'{folder}'{inside} is being written by {holder}. One process writes a run folder at "
                            "a time: wait for it to finish or stop it, or choose another --out.")
    return False


def lock_folder(folder: Path) -> int | None:
    """Take the lock of `folder` (an existing folder): the open file descriptor that holds it, which
    the caller closes when done (the process's end closes it too). None where this process already
    holds it or a containing folder's, or where the file system has no locks (a warning says that then
    nothing stops a second writer)."""
    if fcntl is None:
        warnings.warn("This system has no file locks (fcntl): nothing stops two processes from writing one run "
                      "folder.", stacklevel=3)
        return None
    if check_unlocked(folder):
        return None
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another process took it since the check: name it
        os.close(fd)
        check_unlocked(folder)
        return None
    except OSError as e:
        os.close(fd)
        warnings.warn(f"'{path}' cannot be locked on this file system ({e.strerror}): nothing stops two processes "
                      "from writing this run folder.", stacklevel=3)
        return None
    owner = json.dumps(dict(pid=os.getpid(), host=_host(), command=" ".join(sys.argv),
                            started=time.strftime("%Y-%m-%d %H:%M:%S")))
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    return fd


class RunFolder:
    """One folder per run: config.json, log.jsonl, checkpoint.pt (latest), best.pt, results.

    A folder that already holds a run is refused unless resume (continue it) or overwrite
    (start again) is asked for, so nobody's results are replaced by accident. Only rank 0 writes."""

    def __init__(self, path: str | os.PathLike, resume: bool = False, overwrite: bool = False,
                 is_main: bool = True, checkpointed: bool = True, outputs: Iterable[str] = ()):
        """checkpointed: the run keeps a checkpoint.pt, so --resume needs one; outputs: further
        files or folders of the run that --overwrite removes (with its checkpoints, log and config).

        The process holds the folder's lock (LOCK_FILE) until `close()`, the object's end or its own."""
        self.close: Callable[[], object] = lambda: None
        self.path = Path(path)
        self.is_main = is_main
        for parent in [self.path, *self.path.parents]:
            if parent.exists() and not parent.is_dir():
                raise UserError(f"Output folder '{self.path}' cannot be created: '{parent}' is a file. "
                                "Choose another --out.")
        if is_main:
            check_unlocked(self.path)  # first: another process writing here is the news, whatever else holds
        holds_run = (self.path / "config.json").exists()
        if holds_run and not (resume or overwrite):
            raise UserError(f"Output folder '{self.path}' already holds a run (config.json). Pass --resume to "
                            "continue it, --overwrite to replace it, or choose another --out.")
        if checkpointed and resume and holds_run and not (self.path / "checkpoint.pt").exists():
            raise UserError(f"--resume was given but '{self.path}' holds no checkpoint.pt yet. "
                            "Start again with --overwrite.")
        self.resuming = resume and (self.path / "checkpoint.pt").exists()
        if is_main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"Output folder '{self.path}' cannot be created: {e.strerror}.") from None
            lock = lock_folder(self.path)
            self.close = weakref.finalize(self, os.close, lock) if lock is not None else lambda: None
            if overwrite and not resume:
                for name in ("checkpoint.pt", "best.pt", "log.jsonl", "config.json", *outputs):
                    target = self.path / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            target.unlink()

    @staticmethod
    def redo(path: str | os.PathLike, stage: str, resume: bool, overwrite: bool) -> "RunFolder":
        """A run folder for a stage that keeps no checkpoint.pt (seconds of work): --resume redoes it,
        but only over a run of the same stage, never over another run's checkpoints."""
        config = Path(path) / "config.json"
        if resume and not overwrite and config.exists():
            try:
                found = json.loads(config.read_text()).get("stage")
            except (OSError, ValueError):
                found = None
            if found != stage:
                raise UserError(f"--resume was given but '{path}' holds a '{found}' run, not a {stage} run. "
                                "Choose another --out.")
        return RunFolder(path, resume=False, overwrite=overwrite or resume)

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def start(self, config: dict) -> None:
        """Write config.json for a new run. A resumed run must have the settings it was started with
        (RESUME_MAY_DIFFER aside): else checkpoint.pt and config.json would describe two runs."""
        if not self.resuming:
            self.write_config(config)
            return
        try:
            old = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"--resume: '{self.path}' has no readable config.json, so its settings cannot be "
                            "checked. Pass --overwrite to start again.") from None
        new = json.loads(json.dumps(config, default=str))
        changed = [k for k in dict.fromkeys([*old, *new])
                   if k not in RESUME_MAY_DIFFER and old.get(k) != new.get(k)]
        if changed:
            lines = "".join(f"\n  {k}: {json.dumps(old.get(k))} in the run, {json.dumps(new.get(k))} now" for k in changed)
            raise UserError(f"--resume: '{self.path}' was started with other settings:{lines}\nResume continues a "
                            "run with its own settings; pass those, or pass --overwrite to start again.")

    def write_config(self, config: dict) -> None:
        if self.is_main:
            atomic_write_text(json.dumps(config, indent=2, default=str) + "\n", self.path / "config.json")

    def log(self, record: dict) -> None:
        if self.is_main:
            try:
                with open(self.path / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise UserError(f"Could not write '{self.path / 'log.jsonl'}': "
                                f"{write_error_cause(self.path / 'log.jsonl', e)}.") from None

    def save(self, state: dict, name: str = "checkpoint.pt") -> None:
        if self.is_main:
            atomic_save(state, self.path / name)  # a failed write is a UserError naming its cause


# ----------------------------------------------------------------------------------------------
# Optimisation: the optimiser a stage asks for by name (LARS and the schedule: optim.py)


def make_optimizer(module: nn.Module, name: str, lr: float, weight_decay: float,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """'lars' (SimCLR pretraining) or 'sgd': momentum SGD with Nesterov momentum, as the official SimCLR
    code's 'momentum' optimiser; batch-norm parameters and biases are excluded from weight decay."""
    groups = parameter_groups(module, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        for g in groups:
            g.pop("lars")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise UserError(f"Unknown optimizer '{name}'. Use lars or sgd.")


# ----------------------------------------------------------------------------------------------
# The training loop shared by pretraining, fine-tuning, distillation and transfer


@dataclass
class Schedule:
    """What the loop needs to know about optimisation; `lr` is the peak, already batch-scaled."""
    epochs: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    log_every: int = 20          # steps between host syncs (loss read, non-finite check, progress bar)
    checkpoint_every: int = 0    # steps between checkpoints (0: at the end of each epoch only)
    eval_every: int = 1          # epochs between evaluate() calls
    precision: str = "auto"      # 'auto', 'fp32' or 'bf16' autocast for the forward pass (resolve_precision)


class NonFiniteLoss(UserError):
    pass


class Interrupted(Exception):
    pass


class Stopped(UserError):
    """fit stopped on SIGINT/SIGTERM at a step boundary after saving its checkpoint; --resume continues.

    signum: the signal; progress: where it stopped and what was saved (run_all quotes it)."""

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: Path):
        self.signum = signum
        self.progress = f"at step {step} of {total_steps}; checkpoint saved to '{checkpoint}'"
        super().__init__(f"Stopped by {signal.Signals(signum).name} {self.progress}. "
                         "Resume with the same command plus --resume.")


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop, raised where it lands as Ctrl-C's KeyboardInterrupt is (see main)."""


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "augment": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers (their state-dict keys differ)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


class _LossLog:
    """Losses stay on the device between log lines: `flush` is the loop's one host sync per
    interval. It stops the run on the first non-finite value (before any checkpoint could save
    weights that value touched), logs the mean and updates the progress bar."""

    def __init__(self, run: RunFolder, bar: tqdm, total_steps: int, steps_per_epoch: int, images_per_step: int,
                 optimizer: torch.optim.Optimizer, step: int):
        self.run, self.bar, self.optimizer = run, bar, optimizer
        self.total_steps, self.steps_per_epoch, self.images_per_step = total_steps, steps_per_epoch, images_per_step
        self.buffer: list[torch.Tensor] = []
        self.last_good = run.checkpoint if run.checkpoint.exists() else None
        self.tick, self.tick_step = time.perf_counter(), step

    def add(self, loss: torch.Tensor) -> None:
        self.buffer.append(loss.detach())

    def flush(self, step: int) -> None:
        if not self.buffer:
            return
        values = torch.stack(self.buffer).float().cpu().tolist()
        first = step - len(values)
        for i, v in enumerate(values):
            if not math.isfinite(v):
                where = f"'{self.last_good}'" if self.last_good else "none was written yet"
                raise NonFiniteLoss(f"The loss became {v} at step {first + i + 1} (of {self.total_steps}); the run "
                                    f"was stopped there. Last good checkpoint: {where}. Lower the learning rate "
                                    "or check the input data, then resume or start again.")
        now = time.perf_counter()
        rate = (step - self.tick_step) * self.images_per_step / max(now - self.tick, 1e-9)
        self.tick, self.tick_step = now, step
        lr = self.optimizer.param_groups[0]["lr"]
        record = dict(step=step, epoch=step / self.steps_per_epoch, loss=sum(values) / len(values), lr=lr,
                      images_per_s=round(rate, 1))
        self.run.log(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:,.0f}")
        self.buffer.clear()


@contextlib.contextmanager
def _stop_signals(enabled: bool) -> Iterator[dict]:
    """Ctrl-C and SIGTERM only raise a flag ({'signal': number}), so the loop can save a checkpoint
    at a step boundary and stop cleanly; the previous handlers come back on exit."""
    stop: dict = {"signal": None}
    handlers = {}
    if enabled and hasattr(signal, "SIGTERM"):
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: keep default handling
                handlers[s] = signal.signal(s, lambda signum, frame: stop.update(signal=signum))
    try:
        yield stop
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _restore(run: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer,
             generator: torch.Generator) -> tuple[int, list[dict], float | None]:
    """Load run.checkpoint into model, optimiser and RNGs; returns (step, history, best metric)."""
    ckpt = load_checkpoint(run.checkpoint)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    _set_rng_state(generator, ckpt["rng"])
    return ckpt["step"], json.loads(ckpt["history"]), ckpt.get("best")


def fit(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor],
        loader: BatchLoader, run: RunFolder, schedule: Schedule, *, device: torch.device,
        seed: int = 0, meta: dict | None = None, evaluate: Callable[[], dict] | None = None,
        select: str | None = None, optimizer: torch.optim.Optimizer | None = None,
        distributed: Distributed = Distributed(), desc: str = "train") -> list[dict]:
    """Train `model` by minimising loss_fn(x_uint8, y, generator) over `loader` for schedule.epochs.

    - The learning rate follows `learning_rate` per iteration; the loss is read by the host only
      every `log_every` steps (_LossLog), which also stops on a non-finite loss.
    - checkpoint.pt holds model, optimiser, step, RNG and data position, so resuming (run.resuming)
      gives the same losses as an uninterrupted run on CPU. Ctrl-C / SIGTERM stop at the next step
      boundary (on an epoch's last step, after its evaluation) with checkpoint.pt saved: Stopped.
    - After each `eval_every` epochs `evaluate()` returns metrics; with `select` (e.g. 'val_top1')
      the best state by that metric is kept in best.pt (selection never looks at the test split).
    Returns the list of evaluation records.
    """
    meta = dict(meta or {})
    base = unwrap(model)
    optimizer = optimizer or make_optimizer(base, schedule.optimizer, schedule.lr, schedule.weight_decay,
                                            schedule.momentum)
    steps_per_epoch = len(loader)
    total_steps = schedule.epochs * steps_per_epoch
    warmup_steps = round(schedule.warmup_epochs * steps_per_epoch)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1000 + distributed.rank)
    step, history, best = _restore(run, base, optimizer, generator) if run.resuming else (0, [], None)
    if run.resuming and distributed.is_main:
        print(f"Resuming {run.path} at step {step} of {total_steps}.", file=sys.stderr)

    def state(tag: str) -> dict:
        return dict(kind=meta.get("kind", "run"), format=CHECKPOINT_FORMAT, tag=tag, step=step,
                    model=base.state_dict(), optimizer=optimizer.state_dict(), rng=_rng_state(generator),
                    history=json.dumps(history), best=best, **{k: v for k, v in meta.items() if k != "kind"})

    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not distributed.is_main, leave=False,
               dynamic_ncols=True, mininterval=1.0)
    log = _LossLog(run, bar, total_steps, steps_per_epoch, loader.batch_size * distributed.world_size, optimizer,
                   step)

    def checkpoint() -> None:
        log.flush(step)  # never save weights that a non-finite loss already touched
        run.save(state("checkpoint"))
        log.last_good = run.checkpoint

    with _stop_signals(distributed.is_main) as stop:
        try:
            model.train()
            while step < total_steps:
                epoch, start = divmod(step, steps_per_epoch)
                for x, y in loader.epoch(epoch, start):
                    lr = learning_rate(step, total_steps, warmup_steps, schedule.lr)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    with autocast(device, schedule.precision):
                        loss = loss_fn(x, y, generator)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    log.add(loss)
                    step += 1
                    bar.update(1)
                    if step % schedule.log_every == 0:
                        log.flush(step)
                    if schedule.checkpoint_every and step % schedule.checkpoint_every == 0:
                        checkpoint()
                    # On an epoch's last step the stop waits for the evaluation and best.pt below:
                    # a resumed run starts the next epoch and would never evaluate this one.
                    if stop["signal"] is not None and step % steps_per_epoch:
                        raise Interrupted
                epoch_done = step // steps_per_epoch
                if evaluate is not None and (epoch_done % schedule.eval_every == 0 or step == total_steps):
                    log.flush(step)
                    metrics = evaluate()
                    model.train()
                    history.append(dict(epoch=epoch_done, step=step, **metrics))
                    run.log(history[-1])
                    if distributed.is_main:
                        tqdm.write(f"[{desc}] epoch {epoch_done}: " + ", ".join(
                            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
                    if select is not None and (best is None or metrics[select] > best):
                        best = metrics[select]
                        run.save(dict(state("best"), optimizer={}), "best.pt")
                checkpoint()
                if stop["signal"] is not None:  # on the epoch's last step or during its evaluation: all saved
                    raise Stopped(stop["signal"], step, total_steps, run.checkpoint)
            log.flush(step)
        except Interrupted:
            checkpoint()
            raise Stopped(stop["signal"], step, total_steps, run.checkpoint) from None
        finally:
            bar.close()
    if stop["signal"] is not None:  # it came after the last check, before the handlers were restored
        raise Stopped(stop["signal"], step, total_steps, run.checkpoint)
    return history


# ----------------------------------------------------------------------------------------------
# Models built from a description (so checkpoints carry their own architecture)


def build_simclr_model(arch: dict) -> models.SimCLRModel:
    """arch: encoder, width, cifar_stem, head_layers, head_hidden, out_dim."""
    encoder = models.create_model(arch["encoder"], num_classes=0, width=arch["width"],
                                  cifar_stem=arch["cifar_stem"])
    hidden = arch.get("head_hidden") or encoder.feature_dim
    head = models.ProjectionHead(encoder.feature_dim, hidden, arch["out_dim"], arch["head_layers"])
    return models.SimCLRModel(encoder, head)


def classifier_arch(arch: dict, head_layer: int, num_classes: int, mean=(0.0, 0.0, 0.0),
                    std=(1.0, 1.0, 1.0), dense_layers: Iterable[int] = ()) -> dict:
    """A classifier checkpoint's 'arch': the encoder (and head) description of `arch` plus what the
    Classifier adds on top; build_classifier reads it back."""
    out = dict(arch, head_layer=head_layer, num_classes=num_classes, mean=list(mean), std=list(std))
    if dense_layers:
        out["dense_layers"] = [int(w) for w in dense_layers]
    return out


def build_classifier(arch: dict) -> models.Classifier:
    """A models.Classifier from its description (the 'arch' entry of a classifier checkpoint).

    The projection head is built when the description has one (a SimCLR encoder fine-tuned from a
    head layer, or an older checkpoint describing an unused head) and kept only for head_layer > 0."""
    encoder = models.create_model(arch["encoder"], num_classes=0, width=arch["width"],
                                  cifar_stem=arch["cifar_stem"])
    head = None
    if arch.get("head_layers"):
        hidden = arch.get("head_hidden") or encoder.feature_dim
        head = models.ProjectionHead(encoder.feature_dim, hidden, arch["out_dim"], arch["head_layers"])
    return models.Classifier(encoder, head, arch["head_layer"], arch["num_classes"], arch["mean"], arch["std"],
                             arch.get("dense_layers") or ())


def load_state(module: nn.Module, state: dict, what: str, path) -> None:
    """load_state_dict(strict=True) with a readable report instead of a wall of keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"{what} in '{path}': the checkpoint does not fit the model built for it."]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                lines.append(f"{len(items)} {title}: " + "; ".join(items[:6]) + (" ..." if len(items) > 6 else ""))
        lines.append("Check --model/--width/--cifar-stem against the run that wrote it.")
        raise UserError(" ".join(lines))
    module.load_state_dict(state)


def load_pretrained(path: str | os.PathLike) -> tuple[models.SimCLRModel, dict]:
    """(SimCLRModel with the pretrained weights, checkpoint metadata) from a pretraining checkpoint."""
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != "pretrain":
        raise UserError(f"'{path}' is a '{ckpt['kind']}' checkpoint; a pretraining checkpoint "
                        "(written by simclr.py pretrain) is needed here.")
    model = build_simclr_model(ckpt["arch"])
    load_state(model, ckpt["model"], "The pretrained model", path)
    return model, ckpt


def load_classifier(path: str | os.PathLike, num_classes: int | None = None) -> tuple[models.Classifier, dict]:
    """(models.Classifier, checkpoint) from any classifier checkpoint of the project (finetune,
    linear-eval, distill, transfer: best.pt or checkpoint.pt), dense layers included; `num_classes`
    checks it fits the dataset it will be used on."""
    ckpt = load_checkpoint(path)
    if "arch" not in ckpt or "num_classes" not in ckpt["arch"]:
        raise UserError(f"'{path}' is a '{ckpt['kind']}' checkpoint without a classifier; pass the "
                        "best.pt or checkpoint.pt of a finetune, distill or transfer run.")
    if num_classes is not None and ckpt["arch"]["num_classes"] != num_classes:
        raise UserError(f"The classifier in '{path}' predicts {ckpt['arch']['num_classes']} classes but the "
                        f"dataset has {num_classes}. Use a checkpoint trained on this dataset.")
    model = build_classifier(ckpt["arch"])
    load_state(model, ckpt["model"], "The classifier", path)
    return model, ckpt


# ----------------------------------------------------------------------------------------------
# Encoders from files: pretraining checkpoints, classifiers, torchvision-layout state dicts


# name -> (mean, std) of the inputs a network was trained on, in [0, 1] units.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's supervised weights
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),                  # SimCLR: raw [0, 1] inputs
}


@dataclass
class Encoder:
    """A pretrained encoder and what is needed to use and describe it.

    arch: build_simclr_model's description (encoder, width, cifar_stem, head_layers,
    head_hidden, out_dim); head/head_layer: features after that many projection-head layers
    (0: the encoder output); mean/std: the input normalisation the weights expect."""
    encoder: nn.Module
    head: nn.Module | None
    head_layer: int
    arch: dict
    mean: list[float]
    std: list[float]
    image_size: int
    kind: str            # "pretrain", "classifier" or "torchvision"
    path: str
    classifier: nn.Module | None = None  # the whole classifier when the source is one (for predictions)
    classes: list[str] | None = None
    augmentation: dict | None = None     # pretrain_augmentation(): the views it was pretrained on, if recorded


_ARCH_KEYS = ("encoder", "width", "cifar_stem", "head_layers", "head_hidden", "out_dim")
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def _sidecar(path: str | os.PathLike) -> dict:
    """The JSON that `export` writes next to a state dict (arch, width, stem, mean, std), or {}."""
    side = Path(str(path) + ".json")
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"'{side}' (the description next to '{path}') could not be read: {e}. Fix or delete it.") from None


def state_dict_from(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The torchvision-layout state dict in a loaded file: tensors by name, possibly inside a
    'state_dict' or 'model' entry and with DDP's 'module.' prefix. Anything else is an unknown layout."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"'{path}' is in an unknown layout: expected a state dict (names -> tensors) of a "
                        "torchvision ResNet or VGG, or a checkpoint of this project.")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    if not any(k.startswith(("conv1.", "layer1.", "features.")) for k in obj):
        raise UserError(f"'{path}' is in an unknown layout: its keys ({', '.join(list(obj)[:5])}, ...) are not "
                        "torchvision's ResNet names (conv1.weight, layer1.0.conv1.weight, ...) or VGG names "
                        "(features.0.weight, ...). Convert it to torchvision's layout first.")
    return obj


def load_encoder(path: str | os.PathLike, *, arch: str | None = None, width: float | None = None,
                 cifar_stem: bool | None = None, normalize: str | None = None, head_layer: int | None = None
                 ) -> Encoder:
    """An Encoder from a checkpoint of this project or a torchvision-layout state dict (see module doc).

    arch/width/cifar_stem/normalize describe a torchvision-layout file (defaults: its export side-car,
    else width 1, ImageNet stem, ImageNet normalisation); for a project checkpoint they come from the
    checkpoint, and a different --arch/--width is reported as a mismatch."""
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise UserError(f"Unknown --normalize '{normalize}'. Use one of: {', '.join(NORMALIZATIONS)}.")
    if arch is not None and arch not in models.MODEL_NAMES:
        raise UserError(f"Unknown --arch '{arch}'. Use one of: {', '.join(models.MODEL_NAMES)}.")
    if not Path(path).is_file():
        raise UserError(f"Encoder source '{path}' does not exist (or is not a file). Pass a checkpoint of this "
                        "project or a torchvision-layout state dict.")
    # weights_only: plain types and tensors only, so a downloaded file cannot run code
    raw = load_tensors_only(path, "cpu", what="", hint="It may be damaged or not a PyTorch file; expected a "
                            "checkpoint of this project or a torchvision-layout state dict.")
    if isinstance(raw, dict) and "kind" in raw:
        return _project_encoder(path, raw, arch, width, cifar_stem, normalize, head_layer)
    return _torchvision_encoder(path, state_dict_from(raw, path), arch, width, cifar_stem, normalize, head_layer)


def _project_encoder(path, ckpt: dict, arch, width, cifar_stem, normalize, head_layer) -> Encoder:
    if normalize is not None:
        raise UserError(f"--normalize applies to torchvision-layout files only; '{path}' records its own "
                        f"normalisation (mean {ckpt.get('mean', ckpt.get('arch', {}).get('mean'))}).")
    if ckpt["kind"] == "pretrain":
        model, ckpt = load_pretrained(path)
        a = ckpt["arch"]
        _check_requested(path, a, arch, width, cifar_stem, model.encoder)
        head_layer = head_layer or 0
        if head_layer > a["head_layers"]:
            raise UserError(f"--head-layer {head_layer} is deeper than the {a['head_layers']}-layer projection "
                            f"head of '{path}'.")
        return Encoder(model.encoder, model.head if head_layer else None, head_layer, a, list(ckpt["mean"]),
                       list(ckpt["std"]), int(ckpt["image_size"]), "pretrain", str(path),
                       augmentation=pretrain_augmentation(ckpt))
    model, ckpt = load_classifier(path)
    a = {k: ckpt["arch"][k] for k in _ARCH_KEYS if k in ckpt["arch"]}  # a student has no head
    _check_requested(path, a, arch, width, cifar_stem, model.encoder)
    if head_layer not in (None, model.head_layer):
        raise UserError(f"'{path}' is a classifier using projection-head layer {model.head_layer}; "
                        f"--head-layer {head_layer} cannot be chosen for it.")
    return Encoder(model.encoder, model.head, model.head_layer, a, model.mean.flatten().tolist(),
                   model.std.flatten().tolist(), int(ckpt.get("image_size") or 32), "classifier", str(path),
                   classifier=model, classes=ckpt.get("classes"), augmentation=pretrain_augmentation(ckpt))


def _check_requested(path, have: dict, arch, width, cifar_stem, encoder: nn.Module) -> None:
    """A project checkpoint carries its architecture; a different one asked for is reported with the
    keys and shapes that do not fit, as for a torchvision file."""
    want = dict(encoder=arch or have["encoder"], width=have["width"] if width is None else width,
                cifar_stem=have["cifar_stem"] if cifar_stem is None else cifar_stem)
    if all(want[k] == have[k] for k in want):
        return
    try:
        target = models.create_model(want["encoder"], 0, want["width"], want["cifar_stem"])
        load_state(target, encoder.state_dict(), "The encoder", path)
    except UserError as e:
        raise UserError(f"{e} The checkpoint holds {have['encoder']} width {have['width']} cifar_stem "
                        f"{have['cifar_stem']}; asked for {want['encoder']} width {want['width']} cifar_stem "
                        f"{want['cifar_stem']}.") from None


def _torchvision_encoder(path, state: dict, arch, width, cifar_stem, normalize, head_layer) -> Encoder:
    side = _sidecar(path)
    arch = arch or side.get("arch")
    if arch is None:
        raise UserError(f"'{path}' is a torchvision-layout state dict; say which network it is with --arch "
                        f"({', '.join(models.MODEL_NAMES)}) and --width if not 1.")
    if head_layer:
        raise UserError(f"'{path}' holds an encoder only (no projection head); --head-layer must be 0.")
    width = side.get("width", 1.0) if width is None else width
    cifar_stem = side.get("cifar_stem", False) if cifar_stem is None else cifar_stem
    if normalize is not None:
        mean, std = NORMALIZATIONS[normalize]
    elif "mean" in side:
        mean, std = side["mean"], side["std"]
    else:
        mean, std = NORMALIZATIONS["imagenet"]
    encoder = models.create_model(arch, num_classes=0, width=width, cifar_stem=cifar_stem)
    kept = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    try:
        load_state(encoder, kept, f"The {arch} weights", path)
    except UserError as e:
        raise UserError(f"{e} (Loaded as --arch {arch} --width {width} --cifar-stem {cifar_stem}; the classifier "
                        "keys fc.* / classifier.* are ignored.)") from None
    dropped = [k for k in state if k not in kept]
    print(f"'{path}': {len(kept)} tensors loaded strictly into {arch} (width {width}); the classifier's "
          f"{len(dropped)} ignored ({', '.join(dropped[:4])}{' ...' if len(dropped) > 4 else ''}); input "
          f"normalisation mean {list(mean)} std {list(std)}.", file=sys.stderr)
    a = dict(encoder=arch, width=width, cifar_stem=cifar_stem)
    return Encoder(encoder, None, 0, a, list(mean), list(std), int(side.get("image_size", 224)), "torchvision",
                   str(path), augmentation=side.get(PRETRAIN_AUGMENTATION))


def classifier_for(enc: Encoder, num_classes: int) -> tuple[models.Classifier, dict]:
    """A new linear classifier on `enc` and its checkpoint description (mean/std included)."""
    model = models.Classifier(enc.encoder, enc.head, enc.head_layer, num_classes, enc.mean, enc.std)
    arch = classifier_arch(enc.arch, enc.head_layer, num_classes, enc.mean, enc.std)
    return model, arch


def pretrained_encoder(path: str | os.PathLike, name: str, width: float, cifar_stem: bool,
                       image_size: int) -> tuple[nn.Module, dict]:
    """The encoder of a SimCLR pretraining checkpoint, built as the chosen student architecture, so
    a checkpoint of another architecture is reported key by key and shape by shape; it must have been
    pretrained at the run's image size."""
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != "pretrain":
        raise UserError(f"--student-checkpoint '{path}' is a '{ckpt['kind']}' checkpoint; a SimCLR pretraining "
                        f"checkpoint of the student architecture is needed (python simclr.py pretrain --model {name}).")
    base_size = ckpt.get("image_size")
    if base_size is not None and int(base_size) != image_size:
        raise UserError(f"--student-checkpoint '{path}' was pretrained on {base_size} px images but the teacher "
                        f"works at {image_size} px. Pretrain the student base at {image_size} px.")
    encoder = models.create_model(name, num_classes=0, width=width, cifar_stem=cifar_stem)
    state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    try:
        load_state(encoder, state, "The pretrained encoder", path)
    except UserError as e:
        a = ckpt["arch"]
        raise UserError(f"{e} It was pretrained as {a['encoder']} width {a['width']} cifar_stem {a['cifar_stem']}; "
                        f"this run asked for --student {name} --width {width} --cifar-stem {cifar_stem}.") from None
    return encoder, ckpt


# ----------------------------------------------------------------------------------------------
# The views an encoder was pretrained on
#
# The seed paper's Study 1 fine-tunes with "similar data augmentation operations that were used for
# training the pre-trained model", so fine-tuning, distillation and the probes take the crop floor
# and colour strength from the encoder's pretraining. A pretraining checkpoint records them in its
# config; each classifier trained from it carries them on as PRETRAIN_AUGMENTATION.

PRETRAIN_AUGMENTATION = "pretrain_augmentation"
PRETRAIN_CROP_MIN_SCALE = 0.08  # SimCLR's random-resized-crop floor (v1 appendix A)


def default_strength(image_size: int) -> float:
    """SimCLR's colour strength: 0.5 for CIFAR-sized images (v1 appendix B.9), 1.0 above 64 px."""
    return 0.5 if image_size <= 64 else 1.0


def pretrain_augmentation(ckpt: dict | None) -> dict | None:
    """{crop_min_scale, strength} of the views the encoder in `ckpt` was pretrained on, or None when
    the file does not record them (a torchvision file, a checkpoint older than the record)."""
    if not isinstance(ckpt, dict):
        return None
    if isinstance(ckpt.get(PRETRAIN_AUGMENTATION), dict):
        return dict(ckpt[PRETRAIN_AUGMENTATION])
    if ckpt.get("kind") != "pretrain":
        return None
    config = ckpt.get("config")
    try:
        config = json.loads(config) if isinstance(config, str) else config
    except ValueError:
        return None
    if not isinstance(config, dict) or config.get("crop_min_scale") is None or config.get("strength") is None:
        return None
    return dict(crop_min_scale=float(config["crop_min_scale"]), strength=float(config["strength"]))


def matched_views(recorded: dict | None, image_size: int, *, crop: bool, flip: bool, color: bool,
                  blur: bool = False, crop_min_scale: float | None = None, strength: float | None = None,
                  source: str | os.PathLike | None = None, stage: str = "") -> augment.SimCLRAugment:
    """The stage's augmentation with the encoder's pretraining crop floor and colour strength
    (`recorded`), each replaced by an explicit option. Without a record: pretraining's defaults for
    the image size, and where crop or colour is on, the run says so on stderr (naming `source`, the
    encoder's file; None: no file, nothing to say)."""
    if recorded is None:
        recorded = dict(crop_min_scale=PRETRAIN_CROP_MIN_SCALE, strength=default_strength(image_size))
        if source is not None and (crop or color) and (crop_min_scale is None or strength is None):
            print(f"{stage}: '{source}' does not record the augmentation it was pretrained with; using "
                  f"pretraining's defaults for {image_size} px images (crops from {recorded['crop_min_scale']:.0%} "
                  f"of the image, colour strength {recorded['strength']:g}). --crop-min-scale and --strength "
                  "override them.", file=sys.stderr)
    for given, on, what in ((crop_min_scale, crop, "--crop-min-scale: cropping"),
                            (strength, color, "--strength: colour distortion")):
        if given is not None and not on:
            print(f"{stage}: {what} is off, so the value {given:g} changes nothing.", file=sys.stderr)
    scale = recorded["crop_min_scale"] if crop_min_scale is None else crop_min_scale
    return augment.SimCLRAugment(image_size, crop=crop, flip=flip, color=color, blur=blur,
                                 strength=recorded["strength"] if strength is None else strength, scale=(scale, 1.0))


def carried(recorded: dict | None) -> dict:
    """The checkpoint entry that carries a pretraining record on (none without a record)."""
    return {PRETRAIN_AUGMENTATION: recorded} if recorded else {}


def check_input_size(name: str, image_size: int) -> None:
    """VGG halves the resolution five times without padding the last stage: it needs 32 px or more."""
    if name.startswith("vgg") and image_size < 32:
        raise UserError(f"{name} needs images of at least 32 px (five 2x2 max-pools); this run uses {image_size} px. "
                        "Use a ResNet, or a teacher / --image-size of 32 px or more.")


# ----------------------------------------------------------------------------------------------
# Evaluation: features, classifier accuracy, the linear probe (the kNN monitor is in simclr.py)


def to_float(x: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1], resized to `size` if given and different."""
    x = x.float().div_(255)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], images: ImageSet, device: torch.device,
                     batch_size: int = 512, size: int | None = None, desc: str | None = None,
                     precision: str = "auto") -> torch.Tensor:
    """Apply fn (e.g. an encoder in eval mode) to every image, un-augmented: (N, D) float32 on device."""
    loader = images.batches(min(batch_size, len(images)), device)
    out = []
    for x, _ in tqdm(loader.epoch(0), total=len(loader), desc=desc, disable=desc is None, leave=False):
        with autocast(device, precision):
            out.append(fn(to_float(x, size)).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, images: ImageSet, device: torch.device, batch_size: int = 512,
                        size: int | None = None, precision: str = "auto") -> dict:
    """top1, top5 (when more than 5 classes), per-class accuracy and predictions on un-augmented images."""
    was_training = model.training
    model.eval()
    logits = extract_features(model, images, device, batch_size, size, precision=precision)
    model.train(was_training)
    return accuracy_report(logits, images.labels, images.classes)


def accuracy_report(logits: torch.Tensor, labels, classes: list[str]) -> dict:
    labels = torch.as_tensor(np.asarray(labels), device=logits.device, dtype=torch.long)
    pred = logits.argmax(1)
    report = dict(top1=float((pred == labels).float().mean()))
    if logits.shape[1] > 5:
        top5 = logits.topk(5, dim=1).indices
        report["top5"] = float((top5 == labels[:, None]).any(1).float().mean())
    per_class = {}
    for c, name in enumerate(classes):
        mask = labels == c
        if mask.any():
            per_class[name] = float((pred[mask] == c).float().mean())
    report["per_class"] = per_class
    report["predictions"] = pred.cpu().tolist()
    return report


def check_positive(**values) -> None:
    """check_range(name, value, POSITIVE) for each keyword (settings resolved after the configs)."""
    for name, v in values.items():
        check_range(name, v, POSITIVE)


def check_batch_for_batch_norm(batch_size: int) -> None:
    """Batch norm in training mode needs more than one image per batch to compute a variance."""
    if batch_size == 1:
        raise UserError("--batch-size must be at least 2 when batch norm trains (it needs more than one image "
                        "per batch); got 1.")


def check_frozen(before: dict, module: nn.Module) -> None:
    """Fail loudly if any parameter or batch-norm statistic of a frozen module changed: inflated
    linear-evaluation numbers from a backbone that was not really frozen are a known failure."""
    changed = [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]
    if changed:
        raise RuntimeError(f"The frozen encoder changed during linear evaluation: {changed[:5]}")


def train_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int = 100,
                 batch_size: int = 256, lr: float = 0.1, weight_decay: float = 0.0, seed: int = 0,
                 momentum: float = 0.9) -> nn.Linear:
    """A linear classifier on cached features (standardised with the training set's statistics,
    which a linear layer could absorb, but which makes one learning rate fit every encoder).
    Nesterov momentum SGD with a cosine schedule; returns the layer with the standardisation folded in."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xs = (train_x - mean) / std
    g = torch.Generator(device="cpu").manual_seed(seed)
    linear = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=momentum > 0)
    steps_per_epoch = max(1, math.ceil(len(xs) / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=g).to(xs.device)
        for i in range(0, len(xs), batch_size):
            idx = order[i:i + batch_size]
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, total, 0, lr)
            loss = F.cross_entropy(linear(xs[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():  # fold the standardisation: W((x - m)/s) + b = (W/s) x + (b - W m/s)
        folded = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
        folded.weight.copy_(linear.weight / std)
        folded.bias.copy_(linear.bias - (linear.weight * (mean / std)).sum(1))
    return folded


def linear_probe(model: models.Classifier, task: TaskData, device: torch.device, size: int, *, epochs: int,
                 batch_size: int, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, seed: int = 0,
                 precision: str = "auto") -> dict:
    """SimCLR's linear evaluation protocol (v1 section 4) on a frozen `model`: features of the
    un-augmented train, val and test images, computed once by model.base; a linear layer trained on
    them (train_linear) becomes model.fc. Returns {'val': report, 'test': report} (accuracy_report
    without predictions); fails loudly if the encoder moved."""
    model.eval()
    frozen = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    feats = {name: extract_features(model.base, split, device, size=size, desc=f"features {name}", precision=precision)
             for name, split in (("train", task.train), ("val", task.val), ("test", task.test))}
    labels = torch.as_tensor(np.asarray(task.train.labels), device=device, dtype=torch.long)
    model.fc = train_linear(feats["train"], labels, task.num_classes, epochs, batch_size, lr,
                            weight_decay=weight_decay, seed=seed, momentum=momentum)
    check_frozen(frozen, model.encoder)
    reports = {}
    with torch.no_grad():
        for name, split in (("val", task.val), ("test", task.test)):
            reports[name] = accuracy_report(model.fc(feats[name]), split.labels, task.classes)
            reports[name].pop("predictions")
    return reports


def supervised_loss_fn(model: nn.Module, augmentation: augment.SimCLRAugment):
    """Cross-entropy on one augmented view per image (fine-tuning and transfer)."""
    def loss_fn(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(augmentation(x, generator)).float(), y)
    return loss_fn



# ----------------------------------------------------------------------------------------------
# Command lines: options every script shares, and errors as messages


@dataclass(frozen=True)
class Range:
    """The values a numeric option allows: finite numbers between low and high, each bound open or
    closed (None is always allowed: it means 'the default')."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v: object) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return "positive" if (self.low, self.low_open) == (0, True) else f"at least {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1, low_open=True)     # a share of something that cannot be empty: (0, 1]
UNIT = Range(0, 1)                        # a weight or share that may be 0 or 1
MOMENTUM = Range(0, 1, high_open=True)    # momentum 1 never forgets a gradient: the steps diverge


def check_range(name: str, value: object, allowed: Range) -> None:
    """UserError naming the option, the value and the allowed range, unless every value is allowed."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if value is not None and not all(v in allowed for v in values):
        raise UserError(f"--{name.replace('_', '-')} must be {allowed}; got {value}.")


def validate(config: Any) -> None:
    """Check every option of a config against its `allowed` range (see `option`), before any work."""
    for f in dataclasses.fields(config):
        if "allowed" in f.metadata:
            check_range(f.name, getattr(config, f.name), f.metadata["allowed"])
        choices = f.metadata.get("choices")
        if choices is not None and getattr(config, f.name) not in (*choices, None):  # None: chosen later
            raise UserError(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, choices))}; "
                            f"got {getattr(config, f.name)!r}.")


def bounded(kind: type, allowed: Range, name: str) -> Callable[[str], Any]:
    """An argparse type for an option outside the configs: parse with `kind`, then check the range."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a{'n integer' if kind is int else ' number'}, got '{text}'")
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"--{name} must be {allowed}; got {text}")
        return value
    parse.allowed = allowed  # type: ignore[attr-defined]  (for tests that walk every option)
    return parse


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A config field that is also a command-line option (--field-name): its default, its help and
    the range it allows (`allowed=`, checked by `validate`) are written once, here, and
    `add_options` builds the flag from them. `flag=True` makes a boolean a switch (--skip-bad);
    other booleans take true/false."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


def compile_option() -> Any:
    """The --compile field of every stage that trains a network (resolve_compile)."""
    return option("auto", f"torch.compile the network (linear-aug: the frozen encoder): auto is on for CPU runs of at least "
                  f"{COMPILE_MIN_IMAGES:,} training images (README, Speed), off elsewhere", choices=list(COMPILE_CHOICES))


@dataclass
class StageConfig:
    """The options every stage shares: where it runs and where its data comes from."""
    seed: int = option(0, "random seed", allowed=NON_NEGATIVE)
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = option("auto", "autocast of the forward passes: auto is bf16 on CUDA and on CPUs that compute "
                            "bf16 natively (AMX, AVX512-BF16), else fp32", choices=list(PRECISIONS))
    root: str | None = option(None, "folder for downloaded datasets (default: data.py's default)")
    cache_dir: str | None = option(None, "cache for decoded image folders (default: data.py's default)")
    skip_bad: bool = option(False, "leave unreadable images of a folder out with a warning, instead of stopping",
                            flag=True)


def add_options(parser: argparse.ArgumentParser, config: type, only: Iterable[str] | None = None) -> None:
    """One --flag per field of the dataclass `config` that has help text (see `option`), typed by
    the field's annotation; StageConfig's shared options come last in --help."""
    hints = typing.get_type_hints(config)
    shared = {f.name for f in dataclasses.fields(StageConfig)}
    chosen = [f for f in dataclasses.fields(config) if "help" in f.metadata and (only is None or f.name in only)]
    for f in sorted(chosen, key=lambda f: f.name in shared):
        kwargs = dict(f.metadata)
        allowed = kwargs.pop("allowed", None)
        flags = kwargs.pop("flags", None) or ["--" + f.name.replace("_", "-")]
        kind = hints[f.name]
        if type(None) in typing.get_args(kind):  # X | None: the option takes an X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kwargs.pop("flag", False):
            kwargs["action"] = "store_true"
        elif typing.get_origin(kind) in (list, tuple):
            kind = typing.get_args(kind)[0]
            kwargs.update(type=bounded(kind, allowed, f.name.replace("_", "-")) if allowed else kind, nargs="*")
        elif allowed is not None:  # checked as it is parsed, before any work
            kwargs["type"] = bounded(kind, allowed, f.name.replace("_", "-"))
        else:
            kwargs["type"] = bool_arg if kind is bool else kind
        parser.add_argument(*flags, dest=f.name, default=f.default, **kwargs)


def from_args(config: type, args: argparse.Namespace) -> Any:
    """The dataclass `config` filled from parsed options of the same names (others keep defaults)."""
    return config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)})


def add_run(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--out", required=required, help="run folder: config, log, checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")


def bool_arg(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'")


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated wherever it lands (fit's own handlers take over inside the loop), so
    main answers it as it answers Ctrl-C. torchrun's workers keep the default: their launcher ends them."""
    previous = None
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        with contextlib.suppress(ValueError):  # not the main thread: keep default handling
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None, run: Callable[[argparse.Namespace], None],
         parser: argparse.ArgumentParser) -> int:
    """Parse, run, and turn user errors into one paragraph on stderr and exit code 2 (tracebacks
    stay for bugs). Ctrl-C or SIGTERM outside a training loop (which stops itself: Stopped, exit 2)
    prints the interrupt's own text or how to resume, and exits 128 + the signal (130, 143).
    Returns the exit code, also for --help and for options argparse refuses (2), so that callers in
    Python get a code as well. Shared by every command line of the project."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        with _sigterm_raises():
            run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        print(str(e) or f"Stopped by {signum.name} outside a training loop, before the command finished. Run it "
              "again; a training run continues from its last checkpoint with the same command plus --resume.",
              file=sys.stderr)
        return 128 + signum
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
