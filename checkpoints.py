"""Checkpoints and run folders: everything a run writes and everything rebuilt from a file.

* Atomic writes: a file is written beside its target and renamed over it, so an interrupted or failed
  write never leaves a user's file half-written.
* Checkpoints load tensors and plain values only (``torch.load(weights_only=True)``), so a downloaded
  file cannot run code, and carry their own architecture, so the models are rebuilt from the file.
* ``RunFolder``: one folder per run (config.json, log.jsonl, checkpoint.pt), one writer at a time
  (a lock file), and ``--resume`` only with the settings the run was started with.
* Encoders from files: pretraining checkpoints, fine-tuned classifiers and torchvision-layout
  state dicts, all as an ``Encoder`` ready for a linear head (``Classifier``, models.py).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

import models
from options import UserError, first_line

try:
    import fcntl  # flock: one writer per run folder (Linux, macOS); Windows has none
except ImportError:  # pragma: no cover
    fcntl = None


CHECKPOINT_FORMAT = 1  # written into every checkpoint; load_checkpoint refuses a newer one
# Written into every run's config.json. 2: a stage's config is all its options (asdict of its config
# dataclass) plus the values derived from them; 1 (no entry) listed most stages' settings by hand.
CONFIG_FORMAT = 2


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
            raise UserError(f"{what}'{path}' could not be read (UnpicklingError: {first_line(e)}). {hint}") from None
        # torch's own text explains how to load such a file anyway; the user needs the opposite advice.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        named = f" (it names {found.group(1)})" if found else ""
        raise UserError(f"{what}'{path}' holds objects other than tensors and plain values{named}, so it was not "
                        "loaded, for safety: unpickling them could run code. Never pass weights_only=False to "
                        "torch.load for a file you do not trust. Checkpoints of this project and torchvision-layout "
                        "state dicts hold tensors only.") from None
    except Exception as e:  # torch raises several types for truncated zip archives
        raise UserError(f"{what}'{path}' could not be read ({type(e).__name__}: {first_line(e)}). {hint}") from None


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
# other setting changes what the run is (RELIABILITY_AND_SPEED.md, Reliability: "Resume").
RESUME_MAY_DIFFER = frozenset({"device", "device_resolved", "precision", "precision_resolved", "compile",
                               "log_every", "knn_every", "checkpoint_every", "root", "cache_dir", "skip_bad",
                               "torch", "release", "config_format",
                               "data_seed_resolved"})  # follows from the teacher and the seed, both compared
# Settings added after runs had been written without them: a config.json that lacks one was made with
# the value that reproduces what the run did (before --grayscale, SimCLRAugment's fixed 0.2).
SETTINGS_ADDED_LATER = {"grayscale": 0.2}


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

    @staticmethod
    def config_format(path: str | os.PathLike) -> int | None:
        """The CONFIG_FORMAT of the run in `path` (1: written before formats were recorded), or None
        without a readable config.json."""
        try:
            return int(json.loads((Path(path) / "config.json").read_text()).get("config_format", 1))
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def start(self, config: dict) -> None:
        """Write config.json (with CONFIG_FORMAT) for a new run. A resumed run must have the settings it
        was started with (RESUME_MAY_DIFFER aside): else checkpoint.pt and config.json would describe two
        runs. A run written in another format whose settings differ is refused naming the format."""
        config = dict(config, config_format=CONFIG_FORMAT)
        if not self.resuming:
            self.write_config(config)
            return
        try:
            old = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"--resume: '{self.path}' has no readable config.json, so its settings cannot be "
                            "checked. Pass --overwrite to start again.") from None
        new = json.loads(json.dumps(config, default=str))
        old = {**{k: v for k, v in SETTINGS_ADDED_LATER.items() if k in new}, **old}
        changed = [k for k in dict.fromkeys([*old, *new])
                   if k not in RESUME_MAY_DIFFER and old.get(k) != new.get(k)]
        if changed and old.get("config_format", 1) != CONFIG_FORMAT:
            which = "an older" if old.get("config_format", 1) < CONFIG_FORMAT else "a newer"
            raise UserError(f"--resume: '{self.path}' was started by {which} version of this project, whose "
                            f"config.json (format {old.get('config_format', 1)}) lists the settings differently, so "
                            "this version cannot check that the command matches the run. Finish the run with the "
                            "version that started it, or pass --overwrite to start again.")
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
    pretrain_augmentation: dict | None = None  # pretrain_augmentation(): the views it was pretrained on, if recorded


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
                       pretrain_augmentation=pretrain_augmentation(ckpt))
    model, ckpt = load_classifier(path)
    a = {k: ckpt["arch"][k] for k in _ARCH_KEYS if k in ckpt["arch"]}  # a student has no head
    _check_requested(path, a, arch, width, cifar_stem, model.encoder)
    if head_layer not in (None, model.head_layer):
        raise UserError(f"'{path}' is a classifier using projection-head layer {model.head_layer}; "
                        f"--head-layer {head_layer} cannot be chosen for it.")
    return Encoder(model.encoder, model.head, model.head_layer, a, model.mean.flatten().tolist(),
                   model.std.flatten().tolist(), int(ckpt.get("image_size") or 32), "classifier", str(path),
                   classifier=model, classes=ckpt.get("classes"),
                   pretrain_augmentation=pretrain_augmentation(ckpt))


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
                   str(path), pretrain_augmentation=side.get(PRETRAIN_AUGMENTATION))


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
# The views an encoder was pretrained on, as its file records them (train.matched_views uses them)

PRETRAIN_AUGMENTATION = "pretrain_augmentation"


def pretrain_augmentation(ckpt: dict | None) -> dict | None:
    """{crop_min_scale, strength, grayscale} of the views the encoder in `ckpt` was pretrained on, or
    None when the file does not record them (a torchvision file, a checkpoint older than the record).
    A record from before --grayscale existed reads as the 0.2 those runs used."""
    if not isinstance(ckpt, dict):
        return None
    if isinstance(ckpt.get(PRETRAIN_AUGMENTATION), dict):
        return {"grayscale": SETTINGS_ADDED_LATER["grayscale"], **ckpt[PRETRAIN_AUGMENTATION]}
    if ckpt.get("kind") != "pretrain":
        return None
    config = ckpt.get("config")
    try:
        config = json.loads(config) if isinstance(config, str) else config
    except ValueError:
        return None
    if not isinstance(config, dict) or config.get("crop_min_scale") is None or config.get("strength") is None:
        return None
    return dict(crop_min_scale=float(config["crop_min_scale"]), strength=float(config["strength"]),
                grayscale=float(config.get("grayscale", SETTINGS_ADDED_LATER["grayscale"])))


def carried(pretrain_augmentation: dict | None) -> dict:
    """The checkpoint entry that carries a pretraining record on (none without a record)."""
    return {PRETRAIN_AUGMENTATION: pretrain_augmentation} if pretrain_augmentation else {}
