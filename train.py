"""The shared engine of every stage: devices and precision, the optimiser by name (LARS and the
warm-up + cosine schedule live in optim.py), the training loop, pretraining's defaults by image size,
the views an encoder was pretrained on, and evaluation (features, accuracy, the linear probe); with
them, the option groups the stages' configs share (OptimiserOptions, LoopOptions, PresetViewOptions,
PresetTrainingOptions, MatchedViewOptions). Run folders, checkpoints and the models rebuilt from them
are in checkpoints.py; options and the errors users see, in options.py.

simclr.py, distill.py and transfer.py import this file; none of them imports another stage's file
for plumbing. Apart from pretraining's defaults, nothing here is specific to contrastive learning:
read simclr.py first.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import augment
import models
import options
from checkpoints import CHECKPOINT_FORMAT, RunFolder, load_checkpoint, load_classifier
from optim import LARS, learning_rate, parameter_groups
from options import POSITIVE, PRECISIONS, UserError, check_range, first_line, option


# What the engine needs of the data, and no more (data.py's BatchLoader, ImageSet and TaskData are
# these), so that train.py works with any source that can hand out uint8 batches.
class Batches(Protocol):
    batch_size: int

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]: ...

    def __len__(self) -> int: ...


class Images(Protocol):
    labels: np.ndarray | None
    classes: list[str]

    def batches(self, batch_size: int, device: torch.device) -> Batches: ...

    def __len__(self) -> int: ...


class Task(Protocol):
    train: Images
    val: Images
    test: Images
    classes: list[str]
    num_classes: int


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


@dataclass(frozen=True)
class Runtime:
    """Where a run computes and in which precision, resolved once when it starts (`runtime`) and
    handed to everything that runs a network: the training loop, evaluation, the probes."""
    device: torch.device
    precision: str = "fp32"  # resolved: 'fp32' or 'bf16'

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)


def runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """The Runtime of the --device and --precision options: select_device, then resolve_precision."""
    chosen = select_device(device)
    return Runtime(chosen, resolve_precision(precision, chosen))


COMPILE_CHOICES = ("auto", "on", "off")
# torch.compile pays back its cost (30-60 s on 2 CPU cores per network and batch shape, then shared by
# every later run of that network in the process) after about this many training images at ~1.4x
# the eager speed on CPUs (RELIABILITY_AND_SPEED.md, Speed); 'auto' compiles runs at least this long.
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
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {first_line(e)[:300]}); running eagerly.",
                          stacklevel=2)
            chosen[0] = model
            return model(*args, **kwargs)
    step._orig_mod = model  # unwrap() finds the module behind it
    return step


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ----------------------------------------------------------------------------------------------
# Optimisation: the optimiser a stage asks for by name (LARS and the schedule: optim.py)


OPTIMIZERS = ("lars", "sgd")


@dataclass
class OptimiserOptions:
    """The optimiser options of a stage that sets its own (pretrain, finetune). The defaults are
    fine-tuning's: SGD with momentum and no weight decay."""
    optimizer: str = option("sgd", "LARS (SimCLR) or SGD with momentum", choices=list(OPTIMIZERS))
    momentum: float = option(0.9, "momentum of LARS / SGD", allowed=options.MOMENTUM)
    weight_decay: float = option(0.0, "weight decay (not on biases and BN)", allowed=options.NON_NEGATIVE)


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
class LoopOptions:
    """The options of every stage that trains with `fit`: how often it logs, and whether it compiles
    (resolve_compile)."""
    log_every: int = option(20, "steps between log lines (host syncs)", allowed=options.AT_LEAST_1)
    compile: str = option("auto", "torch.compile the network (linear-aug: the frozen encoder): auto is on for CPU runs "
                          f"of at least {COMPILE_MIN_IMAGES:,} training images (RELIABILITY_AND_SPEED.md, Speed), "
                          "off elsewhere",
                          choices=list(COMPILE_CHOICES))


@dataclass
class PresetViewOptions:
    """The augmentations of a stage with presets (distill, transfer), each the preset's when left as None."""
    crop: bool | None = option(None, "crop augmentation; None: the preset's")
    flip: bool | None = option(None, "flip augmentation; None: the preset's")
    color: bool | None = option(None, "color augmentation; None: the preset's")


@dataclass
class PresetTrainingOptions:
    """The length and optimiser settings of a stage with presets (distill, transfer), each the preset's
    when left as None."""
    epochs: int | None = option(None, "None: the preset's", allowed=options.POSITIVE)
    batch_size: int | None = option(None, "None: the preset's", allowed=options.POSITIVE)
    momentum: float | None = option(None, "None: the preset's", allowed=options.MOMENTUM)
    weight_decay: float | None = option(None, "None: the preset's", allowed=options.NON_NEGATIVE)


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

    def __init__(self, run: RunFolder, total_steps: int, steps_per_epoch: int, images_per_step: int,
                 optimizer: torch.optim.Optimizer, step: int, log_every: int, desc: str, show: bool):
        self.bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not show, leave=False, dynamic_ncols=True,
                        mininterval=1.0)
        self.run, self.optimizer, self.log_every = run, optimizer, log_every
        self.total_steps, self.steps_per_epoch, self.images_per_step = total_steps, steps_per_epoch, images_per_step
        self.buffer: list[torch.Tensor] = []
        self.last_good = run.checkpoint if run.checkpoint.exists() else None
        self.tick, self.tick_step = time.perf_counter(), step

    def add(self, loss: torch.Tensor, step: int) -> None:
        """The loss of step `step` (counted from 1); every log_every steps, flush."""
        self.buffer.append(loss.detach())
        self.bar.update(1)
        if step % self.log_every == 0:
            self.flush(step)

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


def _restore(run: RunFolder, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
             total_steps: int, show: bool) -> tuple[int, list[dict], float | None]:
    """Load run.checkpoint into model, optimiser and RNGs; returns (step, history, best metric)."""
    ckpt = load_checkpoint(run.checkpoint)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    _set_rng_state(generator, ckpt["rng"])
    if show:
        print(f"Resuming {run.path} at step {ckpt['step']} of {total_steps}.", file=sys.stderr)
    return ckpt["step"], json.loads(ckpt["history"]), ckpt.get("best")


def _evaluate_epoch(evaluate: Callable[[], dict], model: nn.Module, log: _LossLog, history: list[dict],
                    epoch: int, step: int, desc: str) -> dict:
    """evaluate() after an epoch, appended to history and the log (and shown); the model back in training mode."""
    log.flush(step)
    metrics = evaluate()
    model.train()
    history.append(dict(epoch=epoch, step=step, **metrics))
    log.run.log(history[-1])
    if not log.bar.disable:
        tqdm.write(f"[{desc}] epoch {epoch}: " + ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return metrics


def fit(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor],
        loader: Batches, run: RunFolder, schedule: Schedule, rt: Runtime, *, seed: int = 0,
        meta: dict | None = None, evaluate: Callable[[], dict] | None = None, select: str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
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
    base = unwrap(model)
    optimizer = optimizer or make_optimizer(base, schedule.optimizer, schedule.lr, schedule.weight_decay,
                                            schedule.momentum)
    steps_per_epoch, total_steps = len(loader), schedule.epochs * len(loader)
    warmup_steps = round(schedule.warmup_epochs * steps_per_epoch)
    generator = torch.Generator(device=rt.device).manual_seed(seed * 1000 + distributed.rank)
    step, history, best = (_restore(run, base, optimizer, generator, total_steps, distributed.is_main)
                           if run.resuming else (0, [], None))

    def state(tag: str) -> dict:
        return dict(kind=(meta or {}).get("kind", "run"), format=CHECKPOINT_FORMAT, tag=tag, step=step,
                    model=base.state_dict(), optimizer=optimizer.state_dict(), rng=_rng_state(generator),
                    history=json.dumps(history), best=best, **{k: v for k, v in (meta or {}).items() if k != "kind"})
    log = _LossLog(run, total_steps, steps_per_epoch, loader.batch_size * distributed.world_size, optimizer, step,
                   schedule.log_every, desc, distributed.is_main)

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
                    for g in optimizer.param_groups:
                        g["lr"] = learning_rate(step, total_steps, warmup_steps, schedule.lr)
                    with rt.autocast():
                        loss = loss_fn(x, y, generator)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    log.add(loss, step)
                    if schedule.checkpoint_every and step % schedule.checkpoint_every == 0:
                        checkpoint()
                    # On an epoch's last step the stop waits for the evaluation and best.pt below:
                    # a resumed run starts the next epoch and would never evaluate this one.
                    if stop["signal"] is not None and step % steps_per_epoch:
                        raise Interrupted
                epoch_done = step // steps_per_epoch
                if evaluate is not None and (epoch_done % schedule.eval_every == 0 or step == total_steps):
                    metrics = _evaluate_epoch(evaluate, model, log, history, epoch_done, step, desc)
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
            log.bar.close()
    if stop["signal"] is not None:  # it came after the last check, before the handlers were restored
        raise Stopped(stop["signal"], step, total_steps, run.checkpoint)
    return history


# ----------------------------------------------------------------------------------------------
# Pretraining's defaults by image size
#
# Each written once with its reason, as airbench's `hyp`. SimCLR has two recipes: the official code's
# CIFAR-10 command for small images and its ImageNet settings for large ones. simclr.resolve_defaults
# fills a pretraining option left as None from the row of the run's image size, and pretrain --help
# quotes the rows (default_by_size); an encoder that records no augmentation was pretrained with its
# row's colour strength (matched_views). 'embedded' is not a size: it is what the embedded world at
# 32 px changes in the small row, chosen on the kNN check of the cpu preset (shapes5's validation
# split, 500 images; never the test split; RESULTS.md, "How the CPU pretraining settings were
# chosen"). run_all's presets on that world read it, and so does simclr's bench, which times their step.

SMALL_IMAGE_PX = 64  # images up to this size take the small row
PRETRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "small": dict(  # the official CIFAR-10 command (v1 appendix B.9)
        cifar_stem=True,    # B.9's 3x3 stride-1 stem, no max-pool: ImageNet's 7x7/2 stem and pool shrink 32 px to 8
        base_lr=1.0,        # the CIFAR-10 command's learning rate (x batch/256, LARS)
        weight_decay=1e-4,  # the CIFAR-10 command's
        strength=0.5,       # B.9: colour distortion of strength 0.5 on CIFAR-10
        blur=False,         # B.9 leaves Gaussian blur out, for CIFAR-10's small images
    ),
    "large": dict(  # SimCLR's ImageNet settings (v1 section 4 and appendix A)
        cifar_stem=False,   # ResNet's own stem, made for 224 px
        base_lr=0.3,        # v1: learning rate 0.3 x batch/256 with LARS
        weight_decay=1e-6,  # v1's ImageNet weight decay
        strength=1.0,       # v1 appendix A: colour distortion at full strength
        blur=True,          # v1 appendix A: Gaussian blur on half of the views
    ),
    "embedded": dict(
        strength=1.0,       # every image draws its colours at random, so colour alone tells two images apart
                            # (SimCLR v1 section 3, Figure 6) unless the distortion is strong
        crop_min_scale=0.4,  # the class is an outline, and at 32 px a crop of 8% (9x9 pixels) keeps only texture
    ),
}
PRETRAIN_CROP_MIN_SCALE = 0.08  # SimCLR's random-resized-crop floor, the same at every size (v1 appendix A)


def pretrain_defaults(image_size: int) -> dict[str, Any]:
    """The row of PRETRAIN_DEFAULTS that images of `image_size` pixels take."""
    return PRETRAIN_DEFAULTS["small" if image_size <= SMALL_IMAGE_PX else "large"]


def default_by_size(name: str) -> str:
    """How --help says the default of pretraining option `name`: 'on up to 64 px' for a switch,
    '1.0 up to 64 px, else 0.3' for a number."""
    small, large = PRETRAIN_DEFAULTS["small"][name], PRETRAIN_DEFAULTS["large"][name]
    if isinstance(small, bool):
        return f"{'on' if small else 'off'} up to {SMALL_IMAGE_PX} px"
    short = lambda v: f"{v:.0e}".replace("e-0", "e-") if v < 1e-3 else repr(v)  # noqa: E731  (1e-4, not 0.0001)
    return f"{short(small)} up to {SMALL_IMAGE_PX} px, else {short(large)}"


# ----------------------------------------------------------------------------------------------
# The views an encoder was pretrained on
#
# The seed paper's Study 1 fine-tunes with "similar data augmentation operations that were used for
# training the pre-trained model", so fine-tuning, distillation and the probes take the crop floor,
# colour strength and grayscale probability from the encoder's pretraining. A pretraining checkpoint
# records them in its config; each classifier trained from it carries them on
# (checkpoints.pretrain_augmentation).


@dataclass
class MatchedViewOptions:
    """A stage's crop floor and colour strength: those its encoder was pretrained with unless given
    (matched_views)."""
    crop_min_scale: float | None = option(None, "smallest crop area as a fraction of the image, when cropping; None: "
                                          "what the encoder (distill: the teacher's) was pretrained with",
                                          allowed=options.FRACTION)
    strength: float | None = option(None, "colour distortion strength, when colour is on; None: what the encoder "
                                    "(distill: the teacher's) was pretrained with", allowed=options.NON_NEGATIVE)


def matched_views(pretrain_augmentation: dict | None, image_size: int, *, crop: bool, flip: bool, color: bool,
                  blur: bool = False, crop_min_scale: float | None = None, strength: float | None = None,
                  source: str | os.PathLike | None = None, stage: str = "") -> augment.SimCLRAugment:
    """The stage's augmentation with the encoder's pretraining crop floor, colour strength and grayscale
    probability (`pretrain_augmentation`; the first two each replaced by an explicit option). Without
    a record: pretraining's defaults for the image size, and where crop or colour is on, the run says
    so on stderr (naming `source`, the encoder's file; None: no file, nothing to say)."""
    if pretrain_augmentation is None:
        pretrain_augmentation = dict(crop_min_scale=PRETRAIN_CROP_MIN_SCALE,
                                     strength=pretrain_defaults(image_size)["strength"])
        if source is not None and (crop or color) and (crop_min_scale is None or strength is None):
            print(f"{stage}: '{source}' does not record the augmentation it was pretrained with; using "
                  f"pretraining's defaults for {image_size} px images (crops from "
                  f"{pretrain_augmentation['crop_min_scale']:.0%} of the image, colour strength "
                  f"{pretrain_augmentation['strength']:g}). --crop-min-scale and --strength override them.",
                  file=sys.stderr)
    for given, on, what in ((crop_min_scale, crop, "--crop-min-scale: cropping"),
                            (strength, color, "--strength: colour distortion")):
        if given is not None and not on:
            print(f"{stage}: {what} is off, so the value {given:g} changes nothing.", file=sys.stderr)
    scale = pretrain_augmentation["crop_min_scale"] if crop_min_scale is None else crop_min_scale
    colour_strength = pretrain_augmentation["strength"] if strength is None else strength
    return augment.SimCLRAugment(image_size, crop=crop, flip=flip, color=color, blur=blur, strength=colour_strength,
                                 scale=(scale, 1.0),
                                 grayscale=pretrain_augmentation.get("grayscale", augment.SimCLRAugment.GRAYSCALE_P))


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
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], images: Images, rt: Runtime,
                     batch_size: int = 512, size: int | None = None, desc: str | None = None) -> torch.Tensor:
    """Apply fn (e.g. an encoder in eval mode) to every image, un-augmented: (N, D) float32 on the device."""
    loader = images.batches(min(batch_size, len(images)), rt.device)
    out = []
    for x, _ in tqdm(loader.epoch(0), total=len(loader), desc=desc, disable=desc is None, leave=False):
        with rt.autocast():
            out.append(fn(to_float(x, size)).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, images: Images, rt: Runtime, batch_size: int = 512,
                        size: int | None = None) -> dict:
    """top1, top5 (when more than 5 classes), per-class accuracy and predictions on un-augmented images."""
    was_training = model.training
    model.eval()
    logits = extract_features(model, images, rt, batch_size, size)
    model.train(was_training)
    return accuracy_report(logits, images.labels, images.classes)


def val_top1(model: models.Classifier, val: Images, rt: Runtime, size: int,
             features: torch.Tensor | None = None) -> Callable[[], dict]:
    """fit's `evaluate` for model selection: top-1 on the val split, or, given the frozen base's
    `features` of it (computed once), of the layers on top alone."""
    @torch.no_grad()
    def evaluate() -> dict:
        if features is None:
            return dict(val_top1=evaluate_classifier(model, val, rt, size=size)["top1"])
        model.eval()
        return dict(val_top1=accuracy_report(model.classify(features), val.labels, val.classes)["top1"])
    return evaluate


def best_reports(run: RunFolder, task: Task, rt: Runtime, size: int,
                 split_features: dict[str, torch.Tensor] | None = None) -> dict:
    """{val, test}: accuracy reports (without predictions) of the run's best.pt, the epoch `val_top1` chose;
    given its frozen base's features of both splits ({val, test}), of the layers on top alone."""
    best, _ = load_classifier(run.path / "best.pt", task.num_classes)
    best = best.to(rt.device).eval()

    @torch.no_grad()
    def score(name: str, split: Images) -> dict:
        if split_features is None:
            return evaluate_classifier(best, split, rt, size=size)
        return accuracy_report(best.classify(split_features[name]), split.labels, split.classes)
    reports = {name: score(name, split) for name, split in (("val", task.val), ("test", task.test))}
    for report in reports.values():
        report.pop("predictions")
    return reports


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


def linear_probe(model: models.Classifier, task: Task, rt: Runtime, size: int, *, epochs: int,
                 batch_size: int, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, seed: int = 0) -> dict:
    """SimCLR's linear evaluation protocol (v1 section 4) on a frozen `model`: features of the
    un-augmented train, val and test images, computed once by model.base; a linear layer trained on
    them (train_linear) becomes model.fc. Returns {'val': report, 'test': report} (accuracy_report
    without predictions); fails loudly if the encoder moved."""
    model.eval()
    frozen = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    feats = {name: extract_features(model.base, split, rt, size=size, desc=f"features {name}")
             for name, split in (("train", task.train), ("val", task.val), ("test", task.test))}
    labels = torch.as_tensor(np.asarray(task.train.labels), device=rt.device, dtype=torch.long)
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
# Command lines


def main(argv: list[str] | None, run: Callable[[argparse.Namespace], None],
         parser: argparse.ArgumentParser) -> int:
    """options.main for the stages: the same exit codes, and a process group started by
    init_distributed is always torn down."""
    try:
        return options.main(argv, run, parser)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
