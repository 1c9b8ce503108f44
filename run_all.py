"""The seed paper's three studies end to end, in one process: pretrain -> Studies 1, 2, 3 -> tables, figures.

Nguyen, Nguyen & Le, *Semi-Supervised Learning, Transfer Learning, and Knowledge Distillation with
SimCLR* (Georgia Tech), on top of the SimCLR v2 recipe (Chen et al. 2020: pretrain ->
fine-tune -> distill):

    encoders   the project's released SimCLR encoders (encoders/, the cpu and cifar presets), or --pretrained CKPT,
               or SimCLR pretraining on the unlabeled pool here (simclr.pretrain: --from-scratch, and
               the cuda and paper presets)
    Study 1    fine-tune the whole network on the 5-class task (all its training labels) with each of
               the seven augmentation settings of their Table 1; same steps and seed for every row;
               crops and colour distortion as the encoder was pretrained (as in every stage here)
    Study 2    a fine-tuned ResNet teacher distilled with soft labels only (alpha = 1, T = 1) into a
               same-architecture ResNet and a VGG student, each with a frozen SimCLR-pretrained base
               (released, given, or pretrained here on the same pool with the same budget; the ResNet
               base from another seed than the teacher's) and trainable dense layers (their Table 2),
               and as full students trained from scratch (extra rows)
    Study 3    a linear layer on the frozen pretrained encoder, crop + flip, on tasks of 2 to 100 classes
               at batch sizes 32 and 64, same epochs for both (their Table 4, Figure 6); the cifar preset
               also probes a random encoder; a task from the encoder's own pretraining data is an in-domain
               reference, left out of the verdicts

Everything lands in the run folder (--out): stages/NAME.json (one completion record per stage,
written atomically with its results: --resume skips finished stages and reuses them), runs/NAME/
(each stage's own run folder: config, log, checkpoints), and what report.py makes of the results:
results.json (every number, the settings, seeds, versions, device, precision, wall time per stage),
results.md (the tables beside the paper's numbers and a verdict per claim), figure2.png, figure6.png
and pretraining.png (the encoder's pretraining curve, when its log is at hand).

Command line:
    python run_all.py                                  # default preset for the device, embedded data
    python run_all.py --from-scratch                   # the cpu preset, pretraining its encoders here
    python run_all.py --preset cifar --root DIR        # real photos: CIFAR-10 encoders on CIFAR-100 tasks
    python run_all.py --preset tiny --out /tmp/tiny    # the whole pipeline in seconds (the tests)
    python run_all.py --seeds 5                        # mean +- std over 5 seeds per study
    python run_all.py --preset paper --data study1=tf_flowers,study3=cats_vs_dogs:tf_flowers:dtd:cifar100
    python run_all.py --resume --out runs/run_all      # continue an interrupted run

--data maps studies to datasets: comma-separated KEY=VALUE pairs, KEY one of pool (unlabeled
pretraining images), study1, study2 (labeled tasks; study2 follows study1 unless given) and study3
(a colon-separated list of labeled tasks). A VALUE is an embedded name (shapes2, shapes5, shapes47,
shapes100, shapes-pool), a dataset name sources.py knows (cifar10, cifar100, cifar100_coarse, tf_flowers,
dtd, food101, cats_vs_dogs), or a folder (root/class/image for tasks, any image folder for the pool).
NAME@class+class selects classes of a task, labelled in the order given: study3=cifar10@cat+dog:cifar10.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import data
import distill
import options
import report
import simclr
import sources
import train
import transfer
from distill import DistillConfig
from options import UserError
from report import ALL_OPERATIONS, RANDOM_TAG, STUDY1_ROWS, STUDY2_ROWS
from simclr import FinetuneConfig, PretrainConfig
from transfer import TransferConfig

# ----------------------------------------------------------------------------------------------
# Presets: every setting of a run, in one place. "default" picks "cpu" or "cuda" by the device.
#
# pretrain, finetune, distill, probe: each stage's config (simclr.PretrainConfig, simclr.FinetuneConfig,
#           distill.DistillConfig, transfer.TransferConfig); the data, seed, device and checkpoint
#           fields are filled in per run.
# tasks:    sizes of the tasks: images per class with a floor on each split's total; embedded tasks
#           only, unless real=True (then named datasets too, counted on the classes selected; folders
#           keep their own splits); 0 keeps a dataset's own split.
# study3_tasks: Study 3's own sizes, where they differ from Studies 1 and 2's (default: tasks).
# random_row: Study 3 also probes a random encoder of the same architecture (what pretraining adds), at
#           the largest batch size and the first seed: it is in no verdict, and it costs as much as the rest.
# released: None, or the source whose released encoders (RELEASED[source]) the preset starts from
#           instead of pretraining in the run.
# knn_check: the encoder's kNN check on a task's val split: True for study1's task, a task name, or False.
#
# A Study 3 task drawn from the dataset the encoder was pretrained on (the pool's) is an in-domain
# reference: reported and drawn, marked as such, and left out of the verdicts, which are about transfer.

# The embedded world at 32 px departs from SimCLR's CIFAR augmentations in colour strength and crop
# floor: train.PRETRAIN_DEFAULTS['embedded'] gives both and why.
_SMALL_PRETRAIN = dict(head_layers=3, optimizer="lars", knn_k=50, **train.PRETRAIN_DEFAULTS["embedded"])

# Study 3's probe: a new linear layer on the frozen encoder, trained on crop + flip views (the seed
# paper's Study 3, transfer.py's 'paper' preset); each preset sets its epochs.
_PROBE = functools.partial(TransferConfig, mode="linear-aug", preset="paper", crop=True, flip=True, color=False,
                           lr=0.1, weight_decay=0.0)

# The CIFAR-10 encoders' pretraining, as released: SimCLR's CIFAR-10 choices (v1 appendix B.9: LARS,
# temperature 0.5, colour strength 0.5) at batch 256 and base learning rate 2.0, crops from 8%; the
# kNN monitor's k = 200 as in the usual CIFAR protocol.
_CIFAR_PRETRAIN = dict(head_layers=3, optimizer="lars", knn_k=200, strength=0.5, crop_min_scale=0.08,
                       epochs=100, batch_size=256, base_lr=2.0)
# The cifar preset's tasks come from CIFAR-100, whose classes the CIFAR-10 encoders never saw.
# Its flowers superclass holds five flower classes, as the paper's tf_flowers (daisy, dandelion,
# roses, sunflowers, tulips); none is a CIFAR-10 class.
CIFAR100_FLOWERS = "cifar100@orchid+poppy+rose+sunflower+tulip"
# For the paper's cats_vs_dogs, a felid against a canid, as cats against dogs: CIFAR-100 has neither
# cats nor dogs (and CIFAR-10, the encoders' data, has both). Lion and wolf share the large_carnivores
# superclass and a tawny or grey coat on natural backgrounds; tiger and leopard were passed over because
# their stripes and spots would separate the pair by pattern alone, which cats and dogs' varied coats do not.
CIFAR100_PAIR = "cifar100@lion+wolf"

PRESETS: dict[str, dict] = {
    # The tests: every stage runs, nothing is meant to be accurate. VGG needs 32 px inputs.
    "tiny": dict(
        image_size=32, seeds_cpu=1, seeds_cuda=1, knn_check=False, released=None,
        data=dict(pool="shapes-pool", study1="shapes5", study3=["shapes2", "shapes5", "shapes47", "shapes100"]),
        pool_images=128, tasks=dict(train_per_class=2, min_train=80, test_per_class=1, min_test=40),
        pretrain=PretrainConfig(**dict(_SMALL_PRETRAIN, knn_k=10), model="resnet18", width=0.125, epochs=1,
                                batch_size=64, log_every=1),
        vgg="vgg11_bn",
        finetune=FinetuneConfig(head_layer=1, epochs=1, batch_size=16, lr=0.05, optimizer="sgd", weight_decay=0.0),
        distill=DistillConfig(preset="default", epochs=1, batch_size=16, lr=0.05, dense_layers=[32]),
        distill_augment=dict(frozen=False, scratch=True),
        probe=_PROBE(epochs=1), probe_batch_sizes=[32, 64],
    ),
    # A 2-core CPU in under 15 minutes with bf16 (see RESULTS.md): the studies start from the released
    # encoders (RELEASED), three seeds each, at least 1,000 test images per task. The pretraining
    # settings below are used by --from-scratch only: 240 SimCLR steps learn more at 4x SimCLR's CIFAR
    # learning rate (RESULTS.md, "How the CPU pretraining settings were chosen"); the probe runs the
    # paper's 30 epochs.
    "cpu": dict(
        image_size=32, seeds_cpu=3, seeds_cuda=3, knn_check=True, released="shapes",
        data=dict(pool="shapes-pool", study1="shapes5", study3=["shapes2", "shapes5", "shapes47", "shapes100"]),
        pool_images=4096, tasks=dict(train_per_class=20, min_train=1000, test_per_class=10, min_test=1000),
        pretrain=PretrainConfig(**_SMALL_PRETRAIN, model="resnet18", width=0.125, epochs=15, batch_size=256,
                                log_every=10, eval_images=5000, base_lr=4.0),
        vgg="vgg16_bn",
        finetune=FinetuneConfig(head_layer=1, epochs=15, batch_size=64, lr=0.05, optimizer="sgd", weight_decay=0.0),
        distill=DistillConfig(preset="default", epochs=15, batch_size=64, lr=0.05, dense_layers=[256]),
        distill_augment=dict(frozen=False, scratch=True),
        probe=_PROBE(epochs=30), probe_batch_sizes=[32, 64],
    ),
    # Real photos on a 2-core CPU in fp32 (RESULTS.md, "Real photos: CIFAR-10"), as the paper: an encoder
    # pretrained on one set of photos (the released CIFAR-10 encoders) fine-tuned, distilled and probed on
    # photos it never saw (CIFAR-100's). Studies 1 and 2: the five flowers with all their images
    # (2,250 / 250 / 500). Study 3: tasks of 2, 5, 20 and 100 classes with the same number of training
    # images per class, so that only the number of classes changes (the paper's datasets also differed
    # in size), every test image, and a random-encoder row. 36 per class is the fewest that give the
    # 2-class task a whole batch of 64 after the val carve (65 / 7); more would cost time (RESULTS.md).
    # --data study3=...:cifar10 adds CIFAR-10, the encoders' own images, as an in-domain reference.
    # The pretraining settings are the release's (used by --from-scratch only): colour strength 0.5 and
    # crops from 8%, chosen with 5-epoch runs on a validation split of CIFAR-10's training images.
    "cifar": dict(
        image_size=32, seeds_cpu=3, seeds_cuda=3, knn_check="cifar10", released="cifar10",
        data=dict(pool="cifar10", study1=CIFAR100_FLOWERS,
                  study3=[CIFAR100_PAIR, CIFAR100_FLOWERS, "cifar100_coarse", "cifar100"]),
        pool_images=None, tasks=dict(train_per_class=0, min_train=0, test_per_class=0, min_test=0, real=True),
        study3_tasks=dict(train_per_class=36, min_train=0, test_per_class=0, min_test=0, real=True),
        random_row=True,
        pretrain=PretrainConfig(**_CIFAR_PRETRAIN, model="resnet18", width=0.125, log_every=100, knn_every=5),
        vgg="vgg16_bn",
        finetune=FinetuneConfig(head_layer=1, epochs=15, batch_size=64, lr=0.05, optimizer="sgd", weight_decay=0.0),
        distill=DistillConfig(preset="default", epochs=15, batch_size=64, lr=0.05, dense_layers=[256]),
        distill_augment=dict(frozen=False, scratch=True),
        probe=_PROBE(epochs=30), probe_batch_sizes=[32, 64],
    ),
    # One H100 in about 8 minutes: ResNet-18 at full width, enough pretraining for good features.
    "cuda": dict(
        image_size=32, seeds_cpu=3, seeds_cuda=3, knn_check=True, released=None,
        data=dict(pool="shapes-pool", study1="shapes5", study3=["shapes2", "shapes5", "shapes47", "shapes100"]),
        pool_images=30000, tasks=dict(train_per_class=100, min_train=5000, test_per_class=20, min_test=1000),
        pretrain=PretrainConfig(**_SMALL_PRETRAIN, model="resnet18", width=1.0, epochs=40, batch_size=512,
                                log_every=20, eval_images=5000),
        vgg="vgg16_bn",
        finetune=FinetuneConfig(head_layer=1, epochs=20, batch_size=128, lr=0.05, optimizer="sgd", weight_decay=0.0),
        distill=DistillConfig(preset="default", epochs=20, batch_size=128, lr=0.05, dense_layers=[256]),
        distill_augment=dict(frozen=True, scratch=True),
        probe=_PROBE(epochs=15), probe_batch_sizes=[32, 64],
    ),
    # The seed paper's settings on its real datasets (downloaded by data.py): ResNet-50 at 224 px,
    # Table 3's distillation (SGD lr 0.01, momentum 0.9, wd 1e-4, T 1, 100 epochs, best epoch),
    # Study 3's probe (lr 0.1, no weight decay, batch 32 / 64, 30 epochs). For users with a GPU;
    # --pretrained starts from a simclr.py pretraining checkpoint (e.g. one pretrained elsewhere on a
    # bigger GPU) instead of pretraining here.
    "paper": dict(
        image_size=224, seeds_cpu=1, seeds_cuda=3, knn_check=True, released=None,
        data=dict(pool="tf_flowers", study1="tf_flowers", study3=["cats_vs_dogs", "tf_flowers", "dtd", "cifar100"]),
        pool_images=None, tasks=dict(train_per_class=0, min_train=0, test_per_class=0, min_test=0),
        pretrain=PretrainConfig(head_layers=3, optimizer="lars", temperature=0.1, knn_k=200, model="resnet50",
                                width=1.0, epochs=100, batch_size=256, log_every=20),
        vgg="vgg16_bn",
        finetune=FinetuneConfig(head_layer=1, epochs=30, batch_size=64, lr=0.01, optimizer="sgd", weight_decay=1e-4),
        distill=DistillConfig(preset="paper", dense_layers=[256]),
        distill_augment=dict(frozen=False, scratch=True),
        probe=_PROBE(epochs=30), probe_batch_sizes=[32, 64],
    ),
}
PRESET_CHOICES = ("default", *PRESETS)

# The project's released encoders, per source of their pretraining images: SimCLR pretraining
# checkpoints (encoder, projection head, architecture; no optimiser state), committed under encoders/
# with their training logs. The cpu and cifar presets start from them, as the seed paper started
# from Google's released ResNet-50: a 2-core CPU cannot pretrain a strong encoder in minutes. Each
# was made by the command beside it (RESULTS.md, "Released encoders"), which gives the same bytes on the
# same torch and CPU; the sha256 makes sure the run uses exactly those bytes.
ENCODERS = Path(__file__).resolve().parent / "encoders"
_RELEASE_COMMANDS = {
    "shapes": ("python simclr.py pretrain --data shapes-pool --n-images 25600 --model {model} --width 0.125 "
               "--head-layers 3 --epochs {epochs} --batch-size 256 --base-lr 2.0 --strength 1.0 "
               "--crop-min-scale 0.4 --knn-k 50 --eval-images 5000 --knn-every 1 --log-every 100 "
               "--precision {precision} --seed {seed} --out runs/release/{model}-seed{seed} --release encoders/{file}"),
    # --root names the folder that holds cifar-10-batches-py (data.py downloads it there with --download).
    "cifar10": ("python simclr.py pretrain --data cifar10 --root ../shared/data --eval-data cifar10 --model {model} "
                "--width 0.125 --head-layers 3 --epochs {epochs} --batch-size 256 --base-lr 2.0 --crop-min-scale 0.08 "
                "--strength 0.5 --knn-every 5 --log-every 100 --precision {precision} --seed {seed} "
                "--out runs/release/cifar10-{model}-seed{seed} --release encoders/{file}"),
}
RELEASED: dict[str, dict[str, dict]] = {
    "shapes": {
        # Study 1 fine-tunes it, Study 2 distils the result, Study 3 probes it.
        "teacher": dict(file="resnet18-w0.125-seed0.pt", model="resnet18", seed=0, epochs=100, precision="fp32",
                        sha256="87b47f091a99a6e5f0f293525ff41e4604d41268cacc84ff8585383961624373"),
        # The frozen bases of Study 2's students, each from a seed other than the teacher's.
        "resnet": dict(file="resnet18-w0.125-seed1.pt", model="resnet18", seed=1, epochs=30, precision="fp32",
                       sha256="74dc938c1b52d177258fff3614b6b590c04d93294dc63e7e303e185aaacb983b"),
        "vgg": dict(file="vgg16_bn-w0.125-seed2.pt", model="vgg16_bn", seed=2, epochs=30, precision="fp32",
                    sha256="5c1e4029213359b7dc9b46542a48ff5eb9047f392ac0ea992e6f00f9ea87e7d6"),
    },
    # Pretrained on CIFAR-10's 50,000 training images without labels, in bf16 on a CPU with AMX.
    "cifar10": {
        "teacher": dict(file="cifar10-resnet18-w0.125-seed0.pt", model="resnet18", seed=0, epochs=100,
                        precision="bf16", sha256="dfbe0355b6c6feb7ffc8bc7ea034e46187aa30d04243fe5b53bfbeb3e619a278"),
        "resnet": dict(file="cifar10-resnet18-w0.125-seed1.pt", model="resnet18", seed=1, epochs=15,
                       precision="bf16", sha256="68c05fe4082059b601baaf5e53959a366307605fce71669bf0e75891ff1f6bbc"),
        "vgg": dict(file="cifar10-vgg16_bn-w0.125-seed2.pt", model="vgg16_bn", seed=2, epochs=15,
                    precision="bf16", sha256="155621165e9e4742d88853003c46b3974142105d9821cf9bb4519a3b875c6393"),
    },
}


def release_command(role: str, source: str = "shapes") -> str:
    """The one command that made the released encoder `role` of `source` (run from the repository's folder)."""
    return _RELEASE_COMMANDS[source].format(**RELEASED[source][role])


def released_encoder(role: str, source: str = "shapes") -> str:
    """The path of the released encoder `role` of `source`, after checking that its bytes are the released ones."""
    entry = RELEASED[source][role]
    path = ENCODERS / entry["file"]
    rebuild = (f"Restore it (git checkout -- encoders/) or rebuild it with:\n  {release_command(role, source)}\n"
               "Elsewhere than the machine that made it, that command gives an equivalent file with other bytes: "
               f"pass it with {'--pretrained' if role == 'teacher' else f'--{role}-base'}. Or pass --from-scratch "
               "to pretrain inside the run.")
    if not path.is_file():
        raise UserError(f"The released encoder '{path}' is missing. {rebuild}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        raise UserError(f"The released encoder '{path}' has changed: its sha256 is {digest}, the released file's "
                        f"is {entry['sha256']}. {rebuild}")
    return str(path)


DATA_KEYS = ("pool", "study1", "study2", "study3")


def resolve_preset(name: str, device: torch.device) -> tuple[str, dict]:
    """(resolved name, a deep copy of the preset): 'default' is 'cuda' on a GPU, 'cpu' elsewhere."""
    if name == "default":
        name = "cuda" if device.type == "cuda" else "cpu"
    if name not in PRESETS:
        raise UserError(f"Unknown --preset '{name}'. Use one of: {', '.join(PRESET_CHOICES)}.")
    return name, copy.deepcopy(PRESETS[name])


def as_json(value: object) -> object:
    """`value` with every stage config written out as a dict of its fields (for config.json, results.json)."""
    return json.loads(json.dumps(value, default=dataclasses.asdict))


def parse_data(spec: str | None, defaults: dict) -> dict:
    """--data 'study1=PATH,study3=a:b:c' over the preset's mapping -> {pool, study1, study2, study3: [...]}.

    study2 follows study1 unless given, since the Study 2 teacher is Study 1's 'all' row when the
    two studies share a task."""
    mapping = dict(defaults)
    given: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in DATA_KEYS or not value:
            raise UserError(f"--data entry '{part}' is not KEY=VALUE with KEY one of {', '.join(DATA_KEYS)} "
                            "(e.g. --data study1=tf_flowers,study3=shapes2:shapes5:shapes47:shapes100).")
        if key in given:
            raise UserError(f"--data names '{key}' twice ('{given[key]}' and '{value}'); give each study once.")
        given[key] = value
    mapping.update({k: v for k, v in given.items() if k != "study3"})
    if "study3" in given:
        mapping["study3"] = [v.strip() for v in given["study3"].split(":") if v.strip()]
        if not mapping["study3"]:
            raise UserError("--data study3= needs at least one task (colon-separated, e.g. shapes2:shapes5).")
    if "study2" not in given:
        mapping["study2"] = mapping["study1"]
    return mapping


def require_datasets(names: Sequence[str], root: str | None, preset: str) -> None:
    """Refuse, before anything runs, a run whose named datasets are not under `root`, with the
    command that downloads each (folders and embedded tasks report their own errors when loaded)."""
    bases = dict.fromkeys(sources.normalise(data.split_classes(n)[0]) for n in names)
    missing = [b for b in bases if b in sources.DATASETS and not data.is_present(b, root)]
    if missing:
        where = root if root is not None else sources.default_data_root()
        commands = "\n".join(f"  python data.py download {b} --root {where}" for b in missing)
        raise UserError(f"This run (--preset {preset}) needs {', '.join(missing)} under {where}, and it is not there. "
                        f"Download it with:\n{commands}\nand run again, or pass --download true.")


# ----------------------------------------------------------------------------------------------
# Interrupts: Ctrl-C or SIGTERM anywhere ends with where it landed and the command that resumes

# A stage's training loop stops itself (train.Stopped, checkpoint saved); elsewhere the signal raises
# KeyboardInterrupt (SIGTERM: options.Terminated, see options.main). Either way every file written so far is
# whole (stage records, results and figures are written atomically), so --resume picks up from there.
_INTERRUPTS = (KeyboardInterrupt, train.Stopped)


def _tag(error: BaseException, where: str) -> None:
    """Record on an interrupt the part of the run it landed in; the innermost part names it."""
    if isinstance(error, _INTERRUPTS) and not hasattr(error, "run_all_where"):
        error.run_all_where = where


@contextlib.contextmanager
def _part(where: str):
    """Name the part of the run (a block, or a function as a decorator) for an interrupt landing in it."""
    try:
        yield
    except _INTERRUPTS as e:
        _tag(e, where)
        raise


def resume_command(argv: Sequence[str], script: str = "run_all.py") -> str:
    """The command that continues this run: the same arguments, --resume instead of --overwrite."""
    kept = [a for a in argv if a not in ("--resume", "--overwrite")]
    return shlex.join(["python", script, *kept, "--resume"])


def interrupted(error: BaseException, argv: Sequence[str], script: str = "run_all.py") -> KeyboardInterrupt:
    """An interrupt of the run -> the KeyboardInterrupt (options.Terminated for SIGTERM) that options.main
    prints, with where it landed and the resume command, and answers with exit 128 + the signal."""
    if isinstance(error, train.Stopped):
        signum = signal.Signals(error.signum)
    else:
        signum = signal.SIGTERM if isinstance(error, options.Terminated) else signal.SIGINT
    where = getattr(error, "run_all_where", "while preparing the run")
    detail = f" ({error.progress})" if isinstance(error, train.Stopped) else ""
    text = (f"{Path(script).stem} stopped by {signum.name} {where}{detail}. Finished stages are kept. Resume with:\n"
            f"  {resume_command(argv, script)}")
    return options.Terminated(text) if signum == signal.SIGTERM else KeyboardInterrupt(text)


# ----------------------------------------------------------------------------------------------
# Stages: one completion record each, so an interrupted run continues where it stopped


class Pipeline:
    """Runs named stages in order under one outer progress bar.

    A stage is fn(folder, resume) -> JSON-able dict; `folder` is its own run folder (runs/NAME)
    and `resume` says whether that folder holds an interrupted run to continue. Its result is
    written atomically to stages/NAME.json with its wall time; with resume=True a stage whose record
    exists is not run again and its recorded result is returned."""

    def __init__(self, out: Path, resume: bool, total: int):
        self.out, self.resume = out, resume
        (out / "stages").mkdir(parents=True, exist_ok=True)
        (out / "runs").mkdir(exist_ok=True)
        self.records: dict[str, dict] = {}
        self.results: dict[str, dict] = {}  # results.json's 'runs'
        self.bar = tqdm(total=total, desc="run_all", unit="stage", position=0, dynamic_ncols=True)

    def run(self, name: str, fn: Callable[[Path, bool], dict], key: str | None = None) -> dict:
        """Stage `name`'s result, also kept in `results` under `key` (default: `name`)."""
        # A study's dataset may be a folder path: its separators must not become folders here.
        file_name = re.sub(r"[^\w.+-]", "_", name)
        record_path = self.out / "stages" / f"{file_name}.json"
        self.bar.set_postfix_str(name)
        record = self._finished(name, record_path) if self.resume else None
        if record is None:
            record = self._execute(name, fn, self.out / "runs" / file_name, record_path)
        self.records[name] = record
        self.results[key or name] = record["result"]
        self.bar.update(1)
        return record["result"]

    @staticmethod
    def _finished(name: str, record_path: Path) -> dict | None:
        """The record of stage `name` from an earlier run of this folder, or None when it did not finish."""
        if not record_path.exists():
            return None
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged record means the stage did not finish: run it again
        return dict(record, reused=True) if record.get("name") == name else None

    def _execute(self, name: str, fn: Callable[[Path, bool], dict], folder: Path, record_path: Path) -> dict:
        """Run the stage in its folder (continuing from its checkpoint when resuming), then write its record.
        A stage interrupted under an older version of this project starts again: its config.json cannot be
        checked against the stage's settings, and --overwrite would throw away every finished stage."""
        sub_resume = self.resume and (folder / "checkpoint.pt").exists()
        if sub_resume and checkpoints.RunFolder.config_format(folder) != checkpoints.CONFIG_FORMAT:
            tqdm.write(f"Stage '{name}' was interrupted under an older version of this project; it starts again.")
            sub_resume = False
        start = time.perf_counter()
        with _part(f"in stage '{name}'"):
            result = fn(folder, sub_resume)
        record = dict(name=name, result=result, wall_s=round(time.perf_counter() - start, 2),
                      finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), resumed=sub_resume)
        checkpoints.atomic_write_text(json.dumps(record, indent=2) + "\n", record_path)
        return dict(record, reused=False)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Close the bar; an interrupt outside every stage landed between two of them."""
        self.close()
        last = next(reversed(self.records), None)
        _tag(error, f"between stages, after '{last}'" if last else "before the first stage")


def _quiet_copy(result: dict, drop: Sequence[str] = ("per_class",)) -> dict:
    """The result without per-class tables (kept in each stage's own results.json)."""
    if isinstance(result, dict):
        return {k: _quiet_copy(v, drop) for k, v in result.items() if k not in drop}
    return result


# ----------------------------------------------------------------------------------------------
# The pieces each stage runs


@_part("while loading the datasets")
def load_tasks(names: Sequence[str], image_size: int, sizes: dict, seed: int, root: str | None,
               cache_dir: str | None, download: bool, skip_bad: bool = False) -> dict[str, data.TaskData]:
    """Each labeled task once (shared by every seed and stage, so all rows see the same images).

    sizes: train/test images per class with a floor on the totals (train_per_class, min_train,
    test_per_class, min_test) for embedded tasks, and for named datasets too when sizes["real"];
    otherwise real datasets and folders keep their own splits."""
    tasks = {}
    for name in dict.fromkeys(names):
        base, _ = data.split_classes(name)
        # num_classes(base) is None for a folder: a folder keeps its own splits
        sized = base in data.EMBEDDED_TASKS or (sizes.get("real", False) and data.num_classes(base) is not None)
        classes = data.num_classes(name) if sized else None
        # A task sized by the preset; 0 (the paper preset) keeps the source's own sizes.
        n_train = max(sizes["min_train"], classes * sizes["train_per_class"]) if classes else None
        n_test = max(sizes["min_test"], classes * sizes["test_per_class"]) if classes else None
        n_train, n_test = n_train or None, n_test or None
        tasks[name] = data.load_task(name, image_size=image_size, root=root, seed=seed, n_train=n_train,
                                     n_test=n_test, download=download, cache_dir=cache_dir,
                                     skip_bad=skip_bad)
    return tasks


def pretrain_stage(cfg: PretrainConfig, pool: str, eval_task: str | None, image_size: int, n_images: int | None,
                   seed: int, data_seed: int, device: str, root: str | None, cache_dir: str | None,
                   skip_bad: bool = False) -> Callable[[Path, bool], dict]:
    # Every base sees the same pool (same images, same budget): the pool is drawn from data_seed,
    # only the training seed differs. The kNN monitor runs once, at the end.
    cfg = dataclasses.replace(cfg, data=pool, eval_data=eval_task, image_size=image_size, n_images=n_images,
                              seed=seed, data_seed=data_seed, device=device, root=root, cache_dir=cache_dir,
                              skip_bad=skip_bad, knn_every=cfg.epochs)

    def run(folder: Path, resume: bool) -> dict:
        summary = simclr.pretrain(cfg, folder, resume=resume, overwrite=not resume)
        keep = {k: summary[k] for k in ("checkpoint", "knn_top1", "knn_top1_random_encoder") if k in summary}
        loss = [r["loss"] for r in _read_log(folder) if "loss" in r]
        return dict(keep, task=eval_task, model=cfg.model, width=cfg.width, seed=seed,
                    pool_seed=data_seed, final_loss=loss[-1] if loss else None)
    return run


def _read_log(folder: Path) -> list[dict]:
    path = folder / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finetune_stage(checkpoint: str, task: data.TaskData, augmentation: dict, cfg: FinetuneConfig, seed: int,
                   device: str) -> Callable[[Path, bool], dict]:
    def run(folder: Path, resume: bool) -> dict:
        head_layer = min(cfg.head_layer, checkpoints.load_checkpoint(checkpoint)["arch"]["head_layers"])
        stage = dataclasses.replace(cfg, checkpoint=checkpoint, data=task.name, fraction=1.0, head_layer=head_layer,
                                    blur=False, seed=seed, device=device, **augmentation)
        result = simclr.finetune(stage, folder, resume=resume, overwrite=not resume, task=task)
        return dict(_quiet_copy(result), val_top1=result["val"]["top1"], test_top1=result["test"]["top1"])
    return run


def distill_stage(teacher: str, task: data.TaskData, mode: str, student: str, width: float,
                  student_checkpoint: str | None, cfg: DistillConfig, augment: bool, seed: int,
                  device: str) -> Callable[[Path, bool], dict]:
    def run(folder: Path, resume: bool) -> dict:
        stage = dataclasses.replace(cfg, teacher=teacher, data=task.name, student=student, width=width, mode=mode,
                                    student_checkpoint=student_checkpoint if mode != "scratch" else None,
                                    dense_layers=cfg.dense_layers if mode == "frozen" else None,
                                    temperature=1.0, alpha=1.0, soft_labels="online", crop=augment, flip=augment,
                                    color=False, seed=seed, device=device)
        result = distill.distill(stage, folder, resume=resume, overwrite=not resume, task=task)
        return dict(_quiet_copy(result), student_test_top1=result["student"]["test"]["top1"],
                    teacher_test_top1=result["teacher"]["test"]["top1"], agreement_test=result["agreement"]["test"])
    return run


def probe_stage(checkpoint: str, task: data.TaskData, batch_size: int, cfg: TransferConfig, seed: int,
                device: str, views: dict, splits: dict) -> Callable[[Path, bool], dict]:
    """Study 3: a linear layer on the frozen encoder, trained on crop + flip views (transfer.py's
    'linear-aug' mode); the encoder's weights and batch-norm statistics never change. `views`: the
    augmented features of this task and seed, computed by the first batch size and reused by the
    next (the same views either way: transfer.AugmentedFeatures); `splits`: the val and test
    features of this task and encoder, computed by the first seed and reused by every run."""
    def run(folder: Path, resume: bool) -> dict:
        stage = dataclasses.replace(cfg, source=checkpoint, data=task.name, batch_size=batch_size, seed=seed,
                                    device=device)
        result = transfer.transfer(stage, folder, resume=resume, overwrite=not resume, task=task,
                                   shared_features=views, split_features=splits)
        return dict(_quiet_copy(result), val_top1=result["val"]["top1"], test_top1=result["test"]["top1"],
                    test_top5=result["test"].get("top5"))
    return run


def random_encoder_stage(encoder: str, seed: int) -> Callable[[Path, bool], dict]:
    """Study 3's random-encoder row: a pretraining file of the encoder's architecture with untrained
    weights, the kNN check's random encoder (simclr.random_model, same seed), keeping the encoder's
    record of its pretraining views so that the probe of either sees the same views."""
    def run(folder: Path, resume: bool) -> dict:
        ckpt = checkpoints.load_checkpoint(encoder)
        keep = {k: ckpt[k] for k in ("kind", "format", "arch", "image_size", "mean", "std") if k in ckpt}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "random-encoder.pt"
        checkpoints.atomic_save(dict(keep, model=simclr.random_model(ckpt["arch"], seed).state_dict(),
                                     **checkpoints.carried(checkpoints.pretrain_augmentation(ckpt))), path)
        return dict(checkpoint=str(path), seed=seed, arch=ckpt["arch"])
    return run


# ----------------------------------------------------------------------------------------------
# The whole run


RESULT_FILES = ("stages", "results.json", "results.md", "figure2.png", "figure6.png", "pretraining.png")


def prepare_folder(out: Path, settings: dict, resume: bool, overwrite: bool,
                   outputs: Sequence[str] = RESULT_FILES) -> checkpoints.RunFolder:
    """checkpoints.RunFolder's guards (and lock) for the run_all folder, and one more: --resume only with the
    settings the run was started with (its stages would otherwise mix two experiments). The folder
    stays locked while the returned RunFolder lives: every stage writes inside it."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pass one of them.")
    run = checkpoints.RunFolder(out, resume=resume, overwrite=overwrite, checkpointed=False, outputs=outputs)
    config = out / "config.json"
    if resume and config.is_file():
        old = json.loads(config.read_text()).get("settings", {})
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise UserError(f"--resume: '{out}' was started with other settings ({', '.join(changed)} differ). Resume "
                            "with the original options, or pass --overwrite to start again.")
    run.write_config(dict(settings=settings, config_format=checkpoints.CONFIG_FORMAT))
    return run


def pretrained_arch(path: str) -> str:
    """The encoder name of a --pretrained checkpoint, which must be a pretraining checkpoint."""
    ckpt = checkpoints.load_checkpoint(path)
    if ckpt["kind"] != "pretrain":
        raise UserError(f"--pretrained '{path}' is a '{ckpt['kind']}' checkpoint; pass a pretraining "
                        "checkpoint written by simclr.py pretrain (its checkpoint.pt).")
    return ckpt["arch"]["encoder"]


def encoder_check_stage(checkpoint: str, task_name: str, image_size: int, seed: int, rt: train.Runtime, knn_k: int,
                        eval_images: int | None, root: str | None,
                        cache_dir: str | None) -> Callable[[Path, bool], dict]:
    """The pretraining check for an encoder made elsewhere (released or --pretrained): the kNN
    monitor of simclr.pretrain (bank: the task's train split, queries: its val split), beside a
    random encoder of the same architecture."""
    def run(folder: Path, resume: bool) -> dict:
        model, ckpt = checkpoints.load_pretrained(checkpoint)
        sizes = dict(n_train=eval_images) if eval_images and task_name in data.EMBEDDED_TASKS else {}
        task = data.load_task(task_name, image_size=image_size, root=root, seed=seed, cache_dir=cache_dir, **sizes)
        knn = lambda enc: simclr.knn_monitor(enc.to(rt.device), task.train, task.val, rt, knn_k, image_size)  # noqa: E731
        result = dict(checkpoint=checkpoint, task=task_name, knn_top1=knn(model.encoder))
        result["knn_top1_random_encoder"] = knn(simclr.random_encoder(ckpt["arch"], seed))
        return result
    return run


def choose_encoders(p: dict, from_scratch: bool, pretrained: str | None, bases: dict) -> tuple[str | None, dict]:
    """(teacher encoder or None to pretrain it here, {family: base or None}): given files first,
    then the released encoders where the preset starts from them, else pretraining in the run.
    The released bases go with the released teacher only: a given teacher may differ in width."""
    source = None if from_scratch else p["released"]
    teacher = pretrained or (released_encoder("teacher", source) if source else None)
    chosen = {family: bases.get(family) or (released_encoder(family, source) if source and not pretrained else None)
              for family in ("resnet", "vgg")}
    return teacher, chosen


@dataclasses.dataclass
class RunAllConfig(options.StageConfig):
    """run_all's options: the preset, the datasets of each study, the seeds and the encoders the
    studies start from; StageConfig's shared options with --seed as the first of the seeds."""
    preset: str = options.option("default", "default: cuda on a GPU, cpu otherwise; tiny: seconds (tests); cifar: real "
                                 "photos on a CPU (needs CIFAR-10 and CIFAR-100 under --root); paper: the seed paper's settings",
                                 choices=list(PRESET_CHOICES))
    data_spec: str | None = options.option(None, "study-to-dataset map, e.g. study1=tf_flowers,study3=a:b:c "
                                           "(see below)", flags=["--data"], metavar="DATA")
    seeds: int | None = options.option(None, "seeds per study, mean ± std (default: the preset's: 3, 1 for tiny and "
                                       "paper on CPU)", allowed=options.AT_LEAST_1)
    # Not train.LoopOptions' compile: one setting for every stage of the run, and 'auto' weighs the images
    # of all the runs that share a compiled network.
    compile: str = options.option("auto", "torch.compile the training steps: auto compiles a network on a CPU when its "
                                  f"runs together train on at least {train.COMPILE_MIN_IMAGES:,} images (Study 1's "
                                  "fine-tunes in the cpu preset), as each compile is shared by the later runs",
                                  choices=list(train.COMPILE_CHOICES))
    pretrained: str | None = options.option(None, "the SimCLR pretraining checkpoint the studies start from "
                                            "(default: the released encoder for the cpu and cifar presets, else "
                                            "pretrained in the run)")
    resnet_base: str | None = options.option(None, "pretraining checkpoint of Study 2's frozen ResNet student "
                                             "(default: released with the released encoder, else pretrained in the "
                                             "run)")
    vgg_base: str | None = options.option(None, "the same for the frozen VGG student")
    from_scratch: bool = options.option(False, "pretrain every encoder inside the run instead of starting from the "
                                        "released ones (the cuda and paper presets always do, unless given files)",
                                        flag=True)
    download: bool | None = options.option(None, "download named datasets that are missing (default: on for --preset "
                                           "paper)")
    seed: int = options.option(0, "first seed; seed k is SEED + k", allowed=options.NON_NEGATIVE)


@dataclasses.dataclass
class Plan:
    """What run_all decides before it touches the run folder (plan_run); every stage reads it."""
    cfg: RunAllConfig
    rt: train.Runtime
    preset: str                  # resolved: never 'default'
    values: dict                 # a copy of the preset; its stage configs get this run's precision and compile
    mapping: dict                # the dataset of each study (parse_data)
    seeds: list[int]
    teacher: str | None          # the encoder the studies start from; None: SimCLR-pretrained in the run
    bases: dict[str, str | None]  # Study 2's frozen student bases by family; None: pretrained in the run
    download: bool

    @property
    def device(self) -> str:
        """The device as the stage configs name it."""
        return str(self.rt.device)

    @property
    def separate_teacher(self) -> bool:
        """Study 2 on another task than Study 1: its teacher cannot be Study 1's 'all' row."""
        return self.mapping["study2"] != self.mapping["study1"]

    @property
    def knn_task(self) -> str | None:
        """The task whose val split the encoder's kNN check runs on, or None for no check."""
        return (self.mapping["study1"] if self.values["knn_check"] is True else self.values["knn_check"]) or None

    def task_names(self) -> list[str]:
        """Every labeled task of the three studies."""
        return [self.mapping["study1"], self.mapping["study2"], *self.mapping["study3"]]

    @property
    def reference_tasks(self) -> list[str]:
        """Study 3's in-domain references: its tasks drawn from the dataset the pool is (the encoder's
        pretraining images), reported but left out of the verdicts."""
        return [t for t in self.mapping["study3"] if _dataset(t) == _dataset(self.mapping["pool"])]

    def settings(self) -> dict:
        """What the run folder's config.json records and --resume compares (prepare_folder)."""
        return as_json(dict(preset=self.preset, values=self.values, data=self.mapping, seeds=self.seeds,
                            device=self.device, precision=self.rt.precision, pretrained=self.teacher, bases=self.bases,
                            skip_bad=self.cfg.skip_bad))


def _dataset(name: str) -> str:
    """The dataset a task or pool is drawn from: a named dataset's key (cifar-10@cat+dog -> cifar10), else itself."""
    base = data.split_classes(name)[0]
    key = sources.normalise(base)
    return key if key in sources.DATASETS else base


def plan_run(cfg: RunAllConfig) -> Plan:
    """The options checked, device and precision resolved once, then the preset, the datasets, the
    seeds and the encoders to start from."""
    options.validate(cfg)
    rt = train.runtime(cfg.device, cfg.precision)
    preset, values = resolve_preset(cfg.preset, rt.device)
    for key in ("pretrain", "finetune", "distill", "probe"):
        values[key] = dataclasses.replace(values[key], precision=rt.precision)
    mapping = parse_data(cfg.data_spec, values["data"])
    n_seeds = cfg.seeds if cfg.seeds is not None else values["seeds_cuda" if rt.device.type == "cuda" else "seeds_cpu"]
    teacher, bases = choose_encoders(values, cfg.from_scratch, cfg.pretrained,
                                     dict(resnet=cfg.resnet_base, vgg=cfg.vgg_base))
    plan = Plan(cfg, rt, preset, values, mapping, seeds=[cfg.seed + k for k in range(n_seeds)], teacher=teacher,
                bases=bases, download=preset == "paper" if cfg.download is None else cfg.download)
    if not plan.download:
        require_datasets([mapping["pool"], *plan.task_names(), *filter(None, [plan.knn_task])], cfg.root, preset)
    return plan


def load_study_tasks(plan: Plan) -> tuple[dict[str, data.TaskData], dict[str, data.TaskData]]:
    """(Studies 1 and 2's tasks, Study 3's tasks), each loaded once and shared by every seed and stage.
    Study 3 may size its tasks otherwise (the preset's study3_tasks); a task it sizes alike is shared."""
    c, v = plan.cfg, plan.values
    load = functools.partial(load_tasks, image_size=v["image_size"], seed=c.seed, root=c.root, cache_dir=c.cache_dir,
                             download=plan.download, skip_bad=c.skip_bad)
    tasks = load([plan.mapping["study1"], plan.mapping["study2"]], sizes=v["tasks"])
    sizes3 = v.get("study3_tasks", v["tasks"])
    shared = {t: tasks[t] for t in plan.mapping["study3"] if t in tasks and sizes3 == v["tasks"]}
    return tasks, {**shared, **load([t for t in plan.mapping["study3"] if t not in shared], sizes=sizes3)}


def choose_compile(plan: Plan, tasks: dict[str, data.TaskData], tasks3: dict[str, data.TaskData]) -> None:
    """Each stage config's compile setting. A compiled step is shared by every later run of the same
    network in this process, so 'auto' weighs the compile cost against all the images a group of
    such runs trains on. Pretraining weighs its own."""
    values, n, mapping, setting = plan.values, len(plan.seeds), plan.mapping, plan.cfg.compile
    groups = {"finetune": (n * len(STUDY1_ROWS), values["finetune"].epochs, [mapping["study1"]]),
              "distill": (n, values["distill"].epochs or distill.PRESETS[values["distill"].preset]["epochs"],
                          [mapping["study2"]]),
              "probe": (n + bool(values.get("random_row")), values["probe"].epochs, mapping["study3"])}
    for key, (runs, epochs, names) in groups.items():
        images = runs * epochs * sum(len({**tasks, **tasks3}[t].train) for t in names)
        compiled = train.resolve_compile(setting, plan.rt.device, images)
        values[key] = dataclasses.replace(values[key], compile="on" if compiled else "off")
    values["pretrain"] = dataclasses.replace(values["pretrain"], compile=setting)


def count_stages(plan: Plan) -> int:
    """The progress bar's total: the encoder's stage, the student bases pretrained here, each seed's studies."""
    random = bool(plan.values.get("random_row"))
    per_seed = (len(STUDY1_ROWS) + plan.separate_teacher + len(STUDY2_ROWS)
                + len(plan.mapping["study3"]) * len(plan.values["probe_batch_sizes"]))
    return (1 + random * (1 + len(plan.mapping["study3"])) + sum(b is None for b in plan.bases.values())
            + len(plan.seeds) * per_seed)


def run_all(cfg: RunAllConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
            command: str = "") -> dict:
    """Encoders (released, given or pretrained here), the three studies for each seed, then
    results.json / results.md / figures in `out`; `command` is the command line results.md quotes."""
    start, out = time.perf_counter(), Path(out)
    plan = plan_run(cfg)
    # Taken before choose_compile: compiling depends on the machine, which a resume may change.
    settings = plan.settings()
    folder = prepare_folder(out, settings, resume, overwrite)
    train.seed_everything(cfg.seed)
    tasks, tasks3 = load_study_tasks(plan)
    choose_compile(plan, tasks, tasks3)
    teacher_arch = pretrained_arch(plan.teacher) if plan.teacher is not None else plan.values["pretrain"].model
    with Pipeline(out, resume, count_stages(plan)) as pipe:
        encoder = encoder_stage(pipe, plan)
        study1(pipe, plan, tasks[plan.mapping["study1"]], encoder)
        encoder_ckpt = checkpoints.load_checkpoint(encoder)
        width = encoder_ckpt["arch"]["width"]
        bases = student_bases(pipe, plan, teacher_arch, width)
        study2(pipe, plan, tasks[plan.mapping["study2"]], encoder, bases, width)
        study3(pipe, plan, tasks3, encoder)
    with _part("while summarising the stages"):
        summary = report.summarise(pipe.results, plan.mapping, tasks3, plan.seeds, plan.reference_tasks)
    meta = run_meta(plan, encoder, encoder_ckpt, teacher_arch, pipe.results, start, command)
    with _part("while writing the results"):
        results = report.write_results(out, meta, settings, plan.mapping, (tasks, tasks3), pipe.records,
                                       pipe.results, summary, part=_part)
    folder.close()
    return results


def pool_pretrain_stage(plan: Plan, cfg: PretrainConfig, eval_task: str | None,
                        seed: int) -> Callable[[Path, bool], dict]:
    """pretrain_stage on the run's pool, the same images for every encoder (drawn from the first seed)."""
    return pretrain_stage(cfg, plan.mapping["pool"], eval_task, image_size=plan.values["image_size"],
                          n_images=plan.values["pool_images"], seed=seed, data_seed=plan.cfg.seed, device=plan.device,
                          root=plan.cfg.root, cache_dir=plan.cfg.cache_dir, skip_bad=plan.cfg.skip_bad)


def encoder_stage(pipe: Pipeline, plan: Plan) -> str:
    """The checkpoint the studies start from: pretrained here when none is given or released, else
    the given one, checked by kNN where the preset asks for it (both recorded as runs' 'pretrain')."""
    pre = plan.values["pretrain"]
    if plan.teacher is None:
        return pipe.run("pretrain", pool_pretrain_stage(plan, pre, plan.knn_task, plan.cfg.seed))["checkpoint"]
    if plan.knn_task is not None:
        pipe.run("encoder-check", encoder_check_stage(plan.teacher, plan.knn_task, plan.values["image_size"],
                                                      plan.cfg.seed, plan.rt, pre.knn_k, pre.eval_images,
                                                      plan.cfg.root, plan.cfg.cache_dir), key="pretrain")
    return plan.teacher


def study1(pipe: Pipeline, plan: Plan, task: data.TaskData, encoder: str) -> None:
    """Study 1: for each seed, the whole network fine-tuned with each augmentation row of Table 1."""
    for s in plan.seeds:
        for key, _, aug in STUDY1_ROWS:
            pipe.run(f"seed{s}-study1-{key}",
                     finetune_stage(encoder, task, aug, plan.values["finetune"], s, plan.device))


def student_bases(pipe: Pipeline, plan: Plan, resnet_arch: str, width: float) -> dict[str, str]:
    """Study 2's frozen student bases. Those not given or released are SimCLR-pretrained here for
    each student architecture on the same pool with the same budget; the ResNet one from another
    seed, so that it is not the teacher's own encoder."""
    bases, seed = dict(plan.bases), plan.cfg.seed
    for family, arch, base_seed in (("resnet", resnet_arch, seed + 10_000), ("vgg", plan.values["vgg"], seed)):
        if bases[family] is None:
            cfg = dataclasses.replace(plan.values["pretrain"], model=arch, width=width)
            stage = pool_pretrain_stage(plan, cfg, None, base_seed)
            bases[family] = pipe.run(f"pretrain-student-{family}", stage)["checkpoint"]
    return bases


def study2(pipe: Pipeline, plan: Plan, task: data.TaskData, encoder: str, bases: dict[str, str], width: float) -> None:
    """Study 2: for each seed, a ResNet teacher (Study 1's 'all' row, or its own run when Study 2 has
    its own task) distilled into each student of Table 2."""
    archs = {family: pretrained_arch(path) for family, path in bases.items()}
    for s in plan.seeds:
        teacher_run = f"seed{s}-study1-all"
        if plan.separate_teacher:
            teacher_run = f"seed{s}-study2-teacher"
            pipe.run(teacher_run, finetune_stage(encoder, task, ALL_OPERATIONS, plan.values["finetune"], s,
                                                 plan.device))
        for mode, family in STUDY2_ROWS:
            pipe.run(f"seed{s}-study2-{mode}-{family}", distill_stage(
                pipe.results[teacher_run]["best"], task, mode, archs[family], width, bases[family],
                plan.values["distill"], plan.values["distill_augment"][mode], s, plan.device))


def study3(pipe: Pipeline, plan: Plan, tasks: dict[str, data.TaskData], encoder: str) -> None:
    """Study 3: for each seed, a linear probe on the frozen encoder per task and batch size; where the
    preset asks, also on a random encoder of the same architecture at the largest batch size (first seed)."""
    probed = {"": (encoder, plan.values["probe_batch_sizes"], plan.seeds)}
    if plan.values.get("random_row"):
        random = pipe.run("random-encoder", random_encoder_stage(encoder, plan.cfg.seed))["checkpoint"]
        probed[RANDOM_TAG] = (random, [max(plan.values["probe_batch_sizes"])], plan.seeds[:1])
    splits: dict = {(t, tag): {} for t in plan.mapping["study3"] for tag in probed}  # shared by every seed
    for s in plan.seeds:
        for task_name in plan.mapping["study3"]:
            for tag, (checkpoint, batch_sizes, seeds) in probed.items():
                if s not in seeds:
                    continue
                views: dict = {}  # shared by the task's batch sizes (probe_stage)
                for b in batch_sizes:
                    pipe.run(f"seed{s}-study3-{task_name}{tag}-b{b}", probe_stage(
                        checkpoint, tasks[task_name], b, plan.values["probe"], s, plan.device, views,
                        splits[task_name, tag]))


def run_meta(plan: Plan, encoder: str, encoder_ckpt: dict, teacher_arch: str, runs: dict, start: float,
             command: str) -> dict:
    """What results.json and results.md say about the run besides its numbers."""
    teacher = (f"{teacher_arch} fine-tuned with all three augmentations on "
               f"{report.display_name(plan.mapping['study2'])} "
               + ("in its own run per seed" if plan.separate_teacher else "(the 'all' row of Study 1, same seed)"))
    origins = {"teacher": _encoder_origin(plan.teacher),
               **{family: _encoder_origin(b) for family, b in plan.bases.items()}}
    return dict(preset=plan.preset, seeds=plan.seeds, device=report.device_info(plan.rt.device),
                precision=plan.rt.precision, checkpoint=encoder,
                augmentation=checkpoints.pretrain_augmentation(encoder_ckpt),
                wall_s=time.perf_counter() - start, image_size=plan.values["image_size"],
                command=command or f"run_all(preset={plan.cfg.preset!r})", pretrain=runs.get("pretrain"),
                teacher=teacher, encoders=origins, teacher_arch=teacher_arch, probe=as_json(plan.values["probe"]))


def _encoder_origin(path: str | None) -> str:
    """How results.md names where an encoder came from (None: pretrained in the run)."""
    if path is None:
        return "SimCLR-pretrained in this run"
    released = {str(ENCODERS / e["file"]): e["file"] for roles in RELEASED.values() for e in roles.values()}
    return f"the released encoder encoders/{released[path]}" if path in released else f"the given file {path}"


# ----------------------------------------------------------------------------------------------
# Command line


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, options.HelpFormatter):
    """The module docstring's stage list kept as written, each option with its default."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=RawHelpFormatter)
    options.add_options(p, RunAllConfig)
    options.add_run(p, required=False, default="runs/run_all", resumes_from="its last finished stage")
    return p


def run_study(study: Callable[..., dict], config: type, args: argparse.Namespace, argv: Sequence[str],
              script: str = "run_all.py") -> None:
    """A command line of staged studies (run_all, study1_length): its options -> study(cfg, out, ...); an
    interrupt ends it with where it landed and the command that resumes it."""
    try:
        study(options.from_args(config, args), args.out, resume=args.resume, overwrite=args.overwrite,
              command=" ".join([f"python {script}", *argv]))
    except _INTERRUPTS as e:
        raise interrupted(e, argv, script) from None


def run_command(args: argparse.Namespace, argv: Sequence[str] = ()) -> None:
    run_study(run_all, RunAllConfig, args, argv)



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return train.main(argv, run=lambda args: run_command(args, argv), parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
