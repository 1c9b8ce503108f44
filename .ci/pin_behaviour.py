"""Pin the project's behaviour before a restructuring: run the tiny runs of every command
and record everything they produce, then compare two such records.

    python .ci/pin_behaviour.py record OUT      # runs every command into OUT/runs, writes OUT/record.json
    python .ci/pin_behaviour.py compare A B     # lists every difference between two records

A record holds, for each command: its exit status, its printed lines (stdout and stderr, progress bars
dropped), and every file it wrote: JSON values (wall times and throughput dropped), log lines,
sha256 of binary files (exported weights, .npy features, figures) and, for checkpoints, every tensor's
values. Everything runs in fp32 on the CPU, uncompiled, with fixed seeds, so two records made on the
same machine and torch match exactly unless behaviour changed. Run it from the repository's root.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

# Keys whose values are measurements of the machine, not of behaviour.
VOLATILE = {"wall_s", "images_per_s", "img_s", "elapsed_s", "started", "finished", "time", "date", "versions",
            "platform", "peak_gib", "peak_memory_gib", "device", "command", "hostname", "pid", "created",
            "checkpoint", "best", "path", "out", "released"}
_TIMING = re.compile(r"\b\d+(\.\d+)?\s*(s|ms|min|img/s|images/s|it/s|s/it)\b|\d\d:\d\d(:\d\d)?|img_s=[\d,]+")

COMMON = ["--precision", "fp32", "--device", "cpu", "--seed", "0"]


def commands(runs: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of every command's tiny run, in an order where each finds what it needs."""
    pre, vgg = runs / "pretrain-resnet", runs / "pretrain-vgg"
    ckpt = str(pre / "checkpoint.pt")
    tiny_pre = ["--n-images", "128", "--epochs", "2", "--batch-size", "64", "--width", "0.125", "--head-layers", "3",
                "--eval-images", "200", "--knn-every", "1", "--knn-k", "10", "--log-every", "1", "--compile", "off"]
    task = ["--data", "shapes5", "--train-images", "200", "--test-images", "50"]
    ft = runs / "finetune"
    return [
        ("pretrain-resnet", ["simclr.py", "pretrain", *tiny_pre, *COMMON, "--out", str(pre)]),
        ("pretrain-vgg", ["simclr.py", "pretrain", *tiny_pre, "--model", "vgg11_bn", *COMMON, "--out", str(vgg)]),
        ("linear-eval", ["simclr.py", "linear-eval", "--checkpoint", ckpt, *task, "--epochs", "5", *COMMON,
                         "--out", str(runs / "linear-eval")]),
        ("knn", ["simclr.py", "knn", "--checkpoint", ckpt, *task, "--k", "10", *COMMON]),
        ("finetune", ["simclr.py", "finetune", "--checkpoint", ckpt, *task, "--epochs", "2", "--batch-size", "32",
                      "--compile", "off", *COMMON, "--out", str(ft)]),
        *[(f"distill-{mode}", ["distill.py", "--teacher", str(ft / "best.pt"), *task[:2], "--mode", mode,
                               "--epochs", "1", "--batch-size", "32", "--compile", "off", *COMMON,
                               *(["--student-checkpoint", str(vgg / "checkpoint.pt"), "--student", "vgg11_bn",
                                  "--width", "0.125"] if mode != "scratch" else ["--width", "0.125"]),
                               "--out", str(runs / f"distill-{mode}")])
          for mode in ("scratch", "finetune", "frozen")],
        *[(f"transfer-{mode}", ["transfer.py", "train", "--source", ckpt, *task[:2], "--mode", mode, "--epochs", "2",
                                "--batch-size", "32", "--compile", "off", *COMMON, "--out", str(runs / f"transfer-{mode}")])
          for mode in ("linear-cached", "linear-aug", "finetune")],
        ("export", ["transfer.py", "export", "--source", ckpt, "--out", str(runs / "export" / "encoder.pt")]),
        ("extract", ["transfer.py", "extract", "--source", ckpt, "--images", str(runs / "images"), "--device", "cpu",
                     "--out", str(runs / "extract" / "features")]),
        ("run_all-tiny", ["run_all.py", "--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--compile", "off",
                          "--out", str(runs / "run_all")]),
    ]


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str):
        return _TIMING.sub("<t>", value)
    return value


def _file_record(path: Path):
    if path.suffix == ".json":
        return _clean(json.loads(path.read_text()))
    if path.suffix == ".jsonl":
        return [_clean(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".md":
        return _TIMING.sub("<t>", path.read_text()).splitlines()
    if path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=False)
        return _tensors(state)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors(obj):
    """Every tensor of a checkpoint as a sha256 of its bytes; other leaves cleaned as JSON values."""
    if isinstance(obj, torch.Tensor):
        return hashlib.sha256(obj.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    if isinstance(obj, dict):
        return {str(k): _tensors(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, (list, tuple)):
        return [_tensors(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("{"):
        try:
            return _clean(json.loads(obj))
        except ValueError:
            pass
    return _clean(obj) if isinstance(obj, (str, int, float, bool, type(None))) else repr(type(obj))


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _lines(text: str) -> list[str]:
    """Printed lines without progress bars (tqdm redraws them with carriage returns and escapes)."""
    lines = (_ANSI.sub("", line).strip() for line in text.replace("\r", "\n").splitlines())
    keep = [line for line in lines if line and "it/s]" not in line and "s/it]" not in line and "%|" not in line]
    return [_TIMING.sub("<t>", line).replace(str(Path.cwd()), "<repo>") for line in keep]


def record(out: Path) -> None:
    runs = out / "runs"
    (runs / "images").mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, ".")
    import shapes
    from PIL import Image
    images = shapes.generate("shapes5", 12, image_size=32)[0]
    for k, image in enumerate(images):
        Image.fromarray(image).save(runs / "images" / f"{k}.png")
    result = {}
    for name, argv in commands(runs):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
        entry = dict(rc=done.returncode, stdout=_lines(done.stdout), stderr=_lines(done.stderr))
        folder = runs / name.replace("run_all-tiny", "run_all")
        entry["files"] = {str(p.relative_to(folder)): _file_record(p) for p in sorted(folder.rglob("*"))
                          if p.is_file() and p.suffix not in (".lock",)} if folder.is_dir() else {}
        result[name] = entry
        print(f"{name}: rc {done.returncode}, {len(entry['files'])} files", file=sys.stderr)
    text = json.dumps(result, indent=1, sort_keys=True, default=str)  # paths inside the record name <runs>
    (out / "record.json").write_text(text.replace(str(runs.resolve()), "<runs>").replace(str(runs), "<runs>") + "\n")


def _diff(a, b, where: str, found: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                found.append(f"{where}/{k}: only in {'B' if k not in a else 'A'}")
            else:
                _diff(a[k], b[k], f"{where}/{k}", found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", found)
    elif a != b:
        found.append(f"{where}: {str(a)[:120]!s} != {str(b)[:120]!s}")


def compare(a: Path, b: Path) -> int:
    found: list[str] = []
    _diff(json.loads((a / "record.json").read_text()), json.loads((b / "record.json").read_text()), "", found)
    print("\n".join(found) if found else "no difference")
    return 1 if found else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("record").add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args()
    if args.command == "record":
        record(args.out)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
