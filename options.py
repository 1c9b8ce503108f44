"""Command lines: the error a user sees, and every option written once.

A stage's settings are one dataclass whose fields are declared with `option(default, help,
allowed=...)`; `add_options` builds the --flags from those fields and `validate` checks their ranges,
so a setting's default, help text and allowed values are written in one place. Options that several
stages share are declared once, in an option group (a dataclass such as `StageConfig`) that their
configs inherit; a stage that needs another default says so with `override`. `main` runs a command
line and turns a `UserError` into one paragraph on stderr and exit status 2, without a traceback.

Standard library only, so that shapes.py, which raises `UserError`, needs only numpy.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import os
import signal
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence


class UserError(Exception):
    """A problem with the user's input (a path, a name, a setting); the message says what to do.

    Command lines print the message and exit with status 2, without a traceback.
    """


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help of every command line of the project: each option with its default, said once."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


def first_line(error: Exception) -> str:
    """The first line of an exception's text, whole (torch's longer explanations span many lines)."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else ""


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop, raised where it lands as Ctrl-C's KeyboardInterrupt is (see main)."""


PRECISIONS = ("auto", "fp32", "bf16")  # train.resolve_precision says what 'auto' becomes


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


def override(group: type, name: str, default: Any) -> Any:
    """The option `name` of the option group `group` with another default, for a stage that needs one
    (a comment beside it says why): its help and allowed values stay written once, in `group`."""
    return field(default=default, metadata=group.__dataclass_fields__[name].metadata)


@dataclass
class StageConfig:
    """The options every stage shares: where it runs and where its data comes from."""
    seed: int = option(0, "random seed", allowed=NON_NEGATIVE)
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = option("auto", "autocast of the forward passes: auto is bf16 on CUDA and on CPUs that compute "
                            "bf16 natively (AMX, AVX512-BF16), else fp32", choices=list(PRECISIONS))
    root: str | None = option(None, "folder for downloaded datasets (default: $SIMCLR_DATA, else "
                              "$XDG_DATA_HOME/simclr or ~/.local/share/simclr)")
    cache_dir: str | None = option(None, "cache for decoded image folders (default: $SIMCLR_CACHE, else "
                                   "$XDG_CACHE_HOME/simclr or ~/.cache/simclr)")
    skip_bad: bool = option(False, "leave unreadable images of a folder out with a warning, instead of stopping",
                            flag=True)


def declared_by(config: type, name: str) -> type:
    """The class whose own body declares the field `name` of the dataclass `config`: `config` itself,
    or the stage config or option group it inherits the field from."""
    return next(c for c in config.__mro__ if name in inspect.get_annotations(c))


def _help_position(config: type) -> Callable[[dataclasses.Field], tuple[int, int, int]]:
    """Where a field's flag goes in --help: a stage's own options first (a base stage's before those it
    adds), then the option groups it mixes in, in the order it lists them, and StageConfig's options
    last (also where a stage gives one another default or help)."""
    mro = list(config.__mro__)
    shared = list(inspect.get_annotations(StageConfig))

    def position(f: dataclasses.Field) -> tuple[int, int, int]:
        if f.name in shared:
            return 2, 0, shared.index(f.name)
        owner = declared_by(config, f.name)
        in_body = list(inspect.get_annotations(owner)).index(f.name)
        if issubclass(owner, StageConfig):
            return 0, -mro.index(owner), in_body
        return 1, mro.index(owner), in_body
    return position


def add_options(parser: argparse.ArgumentParser, config: type, only: Sequence[str] | None = None) -> None:
    """One --flag per field of the dataclass `config` that has help text (see `option`), typed by
    the field's annotation: all of them in the order of `_help_position`, or those named in `only`, in
    that order. Each flag records the class that declares it (`declared_by`)."""
    hints = typing.get_type_hints(config)
    with_help = {f.name: f for f in dataclasses.fields(config) if "help" in f.metadata}
    chosen = (sorted(with_help.values(), key=_help_position(config)) if only is None
              else [with_help[name] for name in only])
    for f in chosen:
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
        action = parser.add_argument(*flags, dest=f.name, default=f.default, **kwargs)
        action.declared_by = declared_by(config, f.name)  # type: ignore[attr-defined]  (tests count declarations)


def from_args(config: type, args: argparse.Namespace) -> Any:
    """The dataclass `config` filled from parsed options of the same names (others keep defaults)."""
    return config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)})


def add_run(p: argparse.ArgumentParser, required: bool = True, default: str | None = None,
            resumes_from: str = "its checkpoint") -> None:
    """--out, --resume and --overwrite: where a run writes, and what happens to a run already there."""
    p.add_argument("--out", required=required, default=default, help="run folder: config, log, checkpoints")
    p.add_argument("--resume", action="store_true", help=f"continue the run in --out from {resumes_from}")
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
    return 0
