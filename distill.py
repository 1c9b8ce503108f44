"""Knowledge distillation: stage 3 of the SimCLR v2 recipe and the seed paper's Study 2.

A fine-tuned teacher (any classifier checkpoint of this project) imputes soft labels on the
distillation images -- the labeled task's training images with their labels hidden, optionally plus
an unlabeled pool -- and a student minimises SimCLR v2's distillation loss (section 2.3, eq. 2):

    L_distill = - sum_x sum_y P_T(y | x; tau) log P_S(y | x; tau),   P(y | x; tau) = softmax(logits / tau)

optionally mixed with the label loss on the labeled images (eq. 3, weight 1 - alpha).

Three students, one argument apart (`mode`; the architecture is `student`, e.g. resnet18 or vgg16):
    scratch   encoder + linear classifier from random initialisation (v2 self-/big-to-small distillation)
    finetune  encoder initialised from a SimCLR pretraining checkpoint of the student architecture,
              then every weight trained
    frozen    the seed paper's setting (their Figure 5, Table 2): a SimCLR-pretrained base of the
              student architecture stays frozen (weights and batch-norm statistics) and only dense
              layers on top learn. The base must not be the teacher's own pretrained encoder, or a
              same-architecture student starts from the teacher's representation and the architecture
              comparison is decided in advance: that is refused when it can be detected (same file as
              the teacher's pretraining checkpoint, or the same weights as it or as the teacher's encoder).

Soft labels: "online" runs the teacher on the very augmented view the student sees (as SimCLR v2);
"precomputed" runs it once on the un-augmented images (fast; the student still sees augmented views).
Without augmentation both are the same and the teacher runs once; in frozen mode without
augmentation the base features are also computed once, so each step costs only the dense layers.

Model selection: best student top-1 on the validation split (the seed paper's "stop at the best
accuracy", Cho & Hariharan 2019); the test split is only reported.

Command line:  python distill.py --teacher runs/finetune/best.pt --data shapes5 --out runs/distill
               python distill.py --teacher T.pt --data shapes5 --mode frozen --student vgg16 \
                   --student-checkpoint runs/pretrain_vgg16/checkpoint.pt --preset paper --out runs/kd_vgg
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import augment
import checkpoints
import data
import losses
import models
import options
import train
from options import UserError, option

MODES = ("scratch", "finetune", "frozen")
SOFT_LABELS = ("online", "precomputed")

# Every setting a preset fixes; arguments left as None take the preset's value.
PRESETS: dict[str, dict] = {
    # Short runs (tens of epochs, a laptop or one GPU): momentum SGD at lr 0.1 with train.fit's
    # per-step cosine decay, the usual setting for training a ResNet from scratch at batch 128; the
    # paper's 0.01 suits its 100 epochs of dense layers only. Online soft labels on crop + flip
    # views, as SimCLR v2 distils.
    "default": dict(epochs=30, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4, optimizer="sgd",
                    temperature=1.0, crop=True, flip=True, color=False),
    # The seed paper's Table 3: SGD, lr 0.01, momentum 0.9, weight decay 1e-4, temperature 1.0,
    # 100 epochs, best epoch kept. The paper states no batch size and no augmentation for
    # distillation: batch 64 (their Study 3 batch) and no augmentation, which in frozen mode means
    # cached base features. Two differences remain from their Keras SGD: momentum is Nesterov (the
    # official SimCLR optimiser, train.make_optimizer) and the rate decays per step (cosine).
    "paper": dict(epochs=100, batch_size=64, lr=0.01, momentum=0.9, weight_decay=1e-4, optimizer="sgd",
                  temperature=1.0, crop=False, flip=False, color=False),
}


# ----------------------------------------------------------------------------------------------
# Teacher and student construction


def load_teacher(path: str | os.PathLike, task: data.TaskData, device: torch.device) -> tuple[nn.Module, dict]:
    """The teacher in eval mode without gradients, checked against the task's classes."""
    teacher, ckpt = checkpoints.load_classifier(path, task.num_classes)
    names = ckpt.get("classes")
    if names is not None and list(names) != list(task.classes):
        raise UserError(f"The teacher '{path}' was trained on classes {list(names)[:8]} but '{task.name}' has "
                        f"{list(task.classes)[:8]} (same count, different names or order). Use a teacher "
                        "fine-tuned on this dataset.")
    teacher.requires_grad_(False)
    return teacher.to(device).eval(), ckpt


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def check_independent_base(student_checkpoint: str | os.PathLike, base: nn.Module, teacher: models.Classifier,
                           teacher_ckpt: dict, teacher_path: str | os.PathLike) -> None:
    """Refuse a frozen base that is the teacher's own pretrained encoder, which would decide the
    architecture comparison in advance: the same file as the teacher's pretraining checkpoint
    (recorded in the teacher's config), or the same weights as that checkpoint's encoder or as the
    teacher's encoder (a teacher trained with a frozen encoder).
    Undetectable when the teacher's config names no checkpoint that still exists and its encoder was
    fine-tuned; then it is the user's responsibility (the comparison is stated in the docs)."""
    config = json.loads(teacher_ckpt.get("config") or "{}")
    origin = config.get("checkpoint")
    origin = Path(origin) if origin and Path(origin).is_file() else None
    refuse = (f"--student-checkpoint '{student_checkpoint}' is the teacher's own pretrained encoder ({{}}). In "
              "frozen mode the student's base must be pretrained separately for the student architecture "
              "(same data and budget), or a same-architecture student inherits the teacher's representation. "
              "Pretrain one with python simclr.py pretrain --model <student> and pass that checkpoint.")
    if origin is not None and origin.resolve() == Path(student_checkpoint).resolve():
        raise UserError(refuse.format(f"the checkpoint the teacher '{teacher_path}' was fine-tuned from"))
    state = base.state_dict()
    if _same_weights(state, teacher.encoder.state_dict()):
        raise UserError(refuse.format(f"identical weights to the encoder of '{teacher_path}'"))
    if origin is not None:
        origin_ckpt = checkpoints.load_checkpoint(origin)
        origin_state = {k[len("encoder."):]: v for k, v in origin_ckpt.get("model", {}).items()
                        if k.startswith("encoder.")}
        if _same_weights(state, origin_state):
            raise UserError(refuse.format(f"identical weights to '{origin}', the teacher's pretraining checkpoint"))


def build_student(mode: str, name: str, width: float, cifar_stem: bool, num_classes: int,
                  dense_layers: Sequence[int], student_checkpoint: str | os.PathLike | None,
                  image_size: int) -> tuple[models.Classifier, dict]:
    """(student, its 'arch' description for the checkpoint). mean/std come from the pretraining
    checkpoint (SimCLR models see raw [0, 1] inputs: 0 / 1); a scratch student uses 0 / 1 too."""
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if mode == "scratch":
        if student_checkpoint is not None:
            raise UserError("--student-checkpoint is only used by --mode finetune or frozen; scratch trains from "
                            "random initialisation. Drop it or choose another mode.")
        encoder = models.create_model(name, num_classes=0, width=width, cifar_stem=cifar_stem)
    else:
        if student_checkpoint is None:
            raise UserError(f"--mode {mode} needs --student-checkpoint: a SimCLR pretraining checkpoint of the student "
                            f"architecture (python simclr.py pretrain --model {name} --width {width} ..., on the "
                            "teacher's unlabeled data with the same budget).")
        encoder, ckpt = checkpoints.pretrained_encoder(student_checkpoint, name, width, cifar_stem, image_size)
        mean, std = ckpt.get("mean", mean), ckpt.get("std", std)
    arch = dict(encoder=name, width=width, cifar_stem=cifar_stem)  # the student uses no projection head
    arch = checkpoints.classifier_arch(arch, 0, num_classes, mean, std, dense_layers)
    student = models.Classifier(encoder, None, 0, num_classes, mean, std, dense_layers)
    if mode == "frozen":
        student.freeze_base()
    return student, arch


# ----------------------------------------------------------------------------------------------
# Distillation data and loss


def distillation_set(task: data.TaskData, labeled: float, seed: int, extra: data.ImageSet | None
                     ) -> tuple[data.ImageSet, np.ndarray]:
    """(images to distil on, known labels): the task's train images (plus `extra`) whose `labels`
    field holds each image's own index, so a batch tells which soft labels / cached features /
    known labels belong to it; known labels are -1 where hidden. With `labeled` > 0 a class-balanced
    fraction of the train labels stays known (used only when alpha < 1)."""
    known = np.full(len(task.train), -1, dtype=np.int64)
    if labeled > 0:
        index = data.labeled_indices(task.train, labeled, seed)
        known[index] = np.asarray(task.train.labels)[index]
    images = task.train.images
    if extra is not None:
        images = np.concatenate([np.asarray(images), np.asarray(extra.images)])
        known = np.concatenate([known, np.full(len(extra), -1, dtype=np.int64)])
    return data.ImageSet(images, np.arange(len(images), dtype=np.int64), list(task.classes)), known


def distillation_loss_fn(student: models.Classifier | Callable, teacher: nn.Module,
                         view: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                         temperature: float, alpha: float, known: torch.Tensor | None,
                         soft_labels: torch.Tensor | None = None, base_features: torch.Tensor | None = None):
    """The step's loss for train.fit: loss_fn(x uint8 (B,3,H,W), index (B,), generator) -> scalar.

    v2 eq. 3 (losses.distillation_loss): alpha * L_distill + (1 - alpha) * cross-entropy on the
    batch's images whose label is known (`known`: -1 where hidden).
    soft_labels (N, C): precomputed teacher logits; otherwise the teacher runs on the same view.
    base_features (N, D): cached frozen-base features; then x is not used at all. `student` may be
    its compiled forward (train.compiled) when there are no cached features."""
    def loss_fn(x: torch.Tensor, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        v = None if base_features is not None and soft_labels is not None else view(x, generator)
        if soft_labels is not None:
            teacher_logits = soft_labels[index]
        else:
            with torch.inference_mode():
                teacher_logits = teacher(v)
            # Inference tensors may not be saved for backward; a clone outside the mode is a normal one.
            teacher_logits = teacher_logits.clone()
        student_logits = (student.classify(base_features[index]) if base_features is not None else student(v)).float()
        labels = known[index] if known is not None else None
        return losses.distillation_loss(student_logits, teacher_logits.float(), temperature, labels,
                                        alpha if labels is not None else 1.0)
    return loss_fn


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of images on which two classifiers predict the same class."""
    return float(np.mean(np.asarray(a) == np.asarray(b))) if len(a) else 0.0


# ----------------------------------------------------------------------------------------------
# Distillation


@dataclass
class DistillConfig(train.PresetViewOptions, train.MatchedViewOptions, train.PresetTrainingOptions,
                    train.LoopOptions, options.StageConfig):
    """Every setting of a distillation run; settings left as None take PRESETS[preset]'s value, and
    dense_layers None means (256,) in frozen mode and none otherwise."""
    teacher: str = option(None, "classifier checkpoint (best.pt of a finetune/distill/transfer run)", required=True)
    data: str = option("shapes5", "labeled task whose train images (labels hidden) are distilled on")
    mode: str = option("scratch", "student: from scratch, fine-tuned from a pretrained encoder, or frozen pretrained "
                       "base + dense layers (seed paper)", choices=MODES)
    student: str = option("resnet18", "student architecture", choices=models.MODEL_NAMES)
    width: float = option(1.0, "student channel multiplier", allowed=options.POSITIVE)
    cifar_stem: bool | None = option(None, "3x3 stem; None: on up to 64 px")
    student_checkpoint: str | None = option(None, "SimCLR pretraining checkpoint of the student architecture "
                                            "(finetune and frozen modes)")
    dense_layers: list[int] | None = option(None, "widths of the trainable Linear+ReLU layers before the classifier; "
                                            "None: 256 in frozen mode", allowed=options.AT_LEAST_1)
    preset: str = option("default", "'default' (short runs) or 'paper' (the seed paper's Table 3) "
                         "(default: %(default)s)", choices=list(PRESETS))
    temperature: float | None = option(None, "softmax temperature tau (preset: 1.0)", allowed=options.POSITIVE)
    alpha: float = option(1.0, "weight of the distillation term; 1 - alpha for labels", allowed=options.UNIT)
    labeled_fraction: float = option(0.0, "fraction of train labels known (alpha < 1)", allowed=options.UNIT)
    soft_labels: str = option("online", "teacher on each augmented view (SimCLR v2) or once on un-augmented images",
                              choices=SOFT_LABELS)
    extra_unlabeled: str | None = option(None, "extra unlabeled images, e.g. shapes-pool or a folder")
    extra_n: int | None = option(None, "how many extra unlabeled images", allowed=options.POSITIVE)
    lr: float | None = option(None, "peak learning rate, cosine decay; None: the preset's", allowed=options.POSITIVE)
    optimizer: str | None = option(None, "None: the preset's", choices=list(train.OPTIMIZERS))


@dataclass
class DistillData:
    """What a distillation run learns from: the teacher (in eval mode) and its checkpoint, the task at
    the teacher's image size, and the images distilled on with their known labels (distillation_set)."""
    teacher: nn.Module
    teacher_ckpt: dict
    task: data.TaskData
    image_size: int
    images: data.ImageSet
    known: np.ndarray
    data_seed: int | None  # the seed that drew and split the task; None: the caller passed the task in


def teacher_data_seed(teacher_ckpt: dict, default: int) -> int:
    """The seed the teacher's task was drawn and split with: its recorded --data-seed (a fine-tuned
    teacher) or the seed its own distillation drew with (a distilled one), else its --seed (what a
    teacher recorded without either used), else `default`. With another seed the validation carve (and
    a generated task's images) would differ, and the teacher's training images would select the
    student's best epoch."""
    config = json.loads(teacher_ckpt.get("config") or "{}")
    for key in ("data_seed", "data_seed_resolved"):
        if config.get(key) is not None:
            return int(config[key])
    return int(config.get("seed", default))


def load_data(cfg: DistillConfig, batch_size: int, dev: torch.device, task: data.TaskData | None) -> DistillData:
    """The teacher, the task and the images to distil on: the teacher's image size and split seed
    decide the task's images."""
    teacher_ckpt_meta = checkpoints.load_checkpoint(cfg.teacher)
    image_size = int(teacher_ckpt_meta.get("image_size") or 32)
    data_seed = None if task is not None else teacher_data_seed(teacher_ckpt_meta, cfg.seed)
    task = task or data.load_task(cfg.data, image_size=image_size, root=cfg.root, seed=data_seed,
                                  cache_dir=cfg.cache_dir, skip_bad=cfg.skip_bad)
    teacher_model, teacher_ckpt = load_teacher(cfg.teacher, task, dev)
    extra = (data.load_unlabeled(cfg.extra_unlabeled, image_size=image_size, n=cfg.extra_n, root=cfg.root,
                                 seed=cfg.seed,
                                 cache_dir=cfg.cache_dir, skip_bad=cfg.skip_bad) if cfg.extra_unlabeled else None)
    if extra is not None and extra.image_size != task.train.image_size:
        raise UserError(f"--extra-unlabeled '{cfg.extra_unlabeled}' gives {extra.image_size}px images but the task's are "
                        f"{task.train.image_size}px; use sources of one resolution.")
    images, known = distillation_set(task, cfg.labeled_fraction if cfg.alpha < 1.0 else 0.0, cfg.seed, extra)
    if batch_size > len(images):
        raise UserError(f"--batch-size {batch_size} is larger than the {len(images)} distillation images "
                        f"('{task.name}' train{' + ' + cfg.extra_unlabeled if extra else ''}). Use at most {len(images)}.")
    return DistillData(teacher_model, teacher_ckpt, task, image_size, images, known, data_seed)


def resolve_settings(cfg: DistillConfig) -> tuple[dict, tuple[int, ...]]:
    """(the optimisation and augmentation settings: cfg's where given, else the preset's; the dense
    layer widths), after checking every option."""
    options.validate(cfg)
    given = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                 weight_decay=cfg.weight_decay,
                 optimizer=cfg.optimizer, temperature=cfg.temperature, crop=cfg.crop, flip=cfg.flip, color=cfg.color)
    settings = {**PRESETS[cfg.preset], **{k: v for k, v in given.items() if v is not None}}
    train.check_positive(epochs=settings["epochs"], batch_size=settings["batch_size"], lr=settings["lr"],
                         temperature=settings["temperature"])
    if cfg.mode != "frozen":
        train.check_batch_for_batch_norm(settings["batch_size"])
    if cfg.alpha < 1.0 and cfg.labeled_fraction == 0.0:
        raise UserError(f"--alpha {cfg.alpha} mixes in a label loss (weight {1 - cfg.alpha:g}) but --labeled-fraction is 0, "
                        "so no label is known. Pass --labeled-fraction > 0 or --alpha 1.")
    dense_layers = tuple(cfg.dense_layers) if cfg.dense_layers is not None else ((256,) if cfg.mode == "frozen" else ())
    return settings, dense_layers


def load_student(cfg: DistillConfig, dense_layers: tuple[int, ...], d: DistillData, dev: torch.device
                 ) -> tuple[models.Classifier, dict]:
    """(the student on `dev`, its 'arch' for the checkpoint): build_student for cfg.mode, with the
    CIFAR stem up to 64 px unless cfg says; a frozen base must not be the teacher's own encoder."""
    cifar_stem = train.pretrain_defaults(d.image_size)["cifar_stem"] if cfg.cifar_stem is None else cfg.cifar_stem
    train.check_input_size(cfg.student, d.image_size)
    model, arch = build_student(cfg.mode, cfg.student, cfg.width, cifar_stem, d.task.num_classes, dense_layers,
                                cfg.student_checkpoint, d.image_size)
    if cfg.mode == "frozen":
        check_independent_base(cfg.student_checkpoint, model.encoder, d.teacher, d.teacher_ckpt, cfg.teacher)
    return model.to(dev), arch


def student_views(cfg: DistillConfig, settings: dict, pretrain_augmentation: dict | None,
                  image_size: int) -> augment.SimCLRAugment | None:
    """The student's augmentation, None when crop, flip and colour are all off: the crop floor and
    colour strength the teacher's encoder was pretrained with (`pretrain_augmentation`), unless cfg
    gives them."""
    if not (settings["crop"] or settings["flip"] or settings["color"]):
        return None
    return train.matched_views(pretrain_augmentation, image_size, crop=settings["crop"], flip=settings["flip"],
                               color=settings["color"], crop_min_scale=cfg.crop_min_scale, strength=cfg.strength,
                               source=cfg.teacher, stage="distill")


def soft_labels_used(cfg: DistillConfig, augmentation: augment.SimCLRAugment | None) -> str:
    """cfg.soft_labels, or "precomputed" without augmentation: the teacher would see the same
    un-augmented image every epoch, so it runs once."""
    return "precomputed" if augmentation is None else cfg.soft_labels


def caches_base_features(cfg: DistillConfig, augmentation: augment.SimCLRAugment | None) -> bool:
    """Whether the frozen base's features are computed once: in frozen mode without augmentation
    every epoch would compute the same ones, and each step then costs only the dense layers."""
    return cfg.mode == "frozen" and augmentation is None


def student_pretrain_augmentation(cfg: DistillConfig, teacher_pretrain_augmentation: dict | None) -> dict | None:
    """The pretraining augmentation the student's checkpoint carries on: its own base's where it
    has a pretrained base, else its teacher's."""
    if cfg.mode != "scratch" and cfg.student_checkpoint:
        return checkpoints.pretrain_augmentation(checkpoints.load_checkpoint(cfg.student_checkpoint))
    return teacher_pretrain_augmentation


def announce(config: dict) -> None:
    """The run's settings in one line on stderr, as config.json records them."""
    settings = config["effective"]
    print(f"distill: teacher {config['teacher']} -> {config['student']} (width {config['width']}, "
          f"{config['mode']}) on {config['distillation_images']} images of {config['task']}, "
          f"T {settings['temperature']}, alpha {config['alpha']}, soft labels {config['soft_labels_effective']}, "
          f"augment {config['augmentation']}, {settings['optimizer']} lr "
          f"{settings['lr']} wd {settings['weight_decay']}, {settings['epochs']} epochs x batch "
          f"{settings['batch_size']}, device {config['device_resolved']}, {config['precision_resolved']}",
          file=sys.stderr)


def teacher_logits(d: DistillData, rt: train.Runtime) -> torch.Tensor:
    """(N, C): the teacher's logits of every un-augmented distillation image (precomputed soft labels)."""
    with torch.inference_mode():
        table = train.extract_features(d.teacher, d.images, rt, size=d.image_size, desc="teacher soft labels")
    return table.clone()  # a normal tensor, usable in autograd-recorded code


def base_features(model: models.Classifier, d: DistillData, rt: train.Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen base's features of the distillation images and of the val split, un-augmented."""
    model.eval()
    return (train.extract_features(model.base, d.images, rt, size=d.image_size, desc="base features"),
            train.extract_features(model.base, d.task.val, rt, size=d.image_size))


def distillation_objective(cfg: DistillConfig, settings: dict, model: models.Classifier, d: DistillData,
                           augmentation: augment.SimCLRAugment | None, rt: train.Runtime
                           ) -> tuple[Callable, Callable[[], dict]]:
    """(loss_fn, evaluate) for train.fit, the teacher's soft labels precomputed and the base's
    features cached where the views allow it (soft_labels_used, caches_base_features)."""
    view = augmentation if augmentation is not None else (lambda x, g: train.to_float(x, d.image_size))
    cached = caches_base_features(cfg, augmentation)
    table = teacher_logits(d, rt) if soft_labels_used(cfg, augmentation) == "precomputed" else None
    features, val_features = base_features(model, d, rt) if cached else (None, None)
    known = torch.as_tensor(d.known, device=rt.device) if cfg.alpha < 1.0 else None
    # With cached base features only the dense layers run: nothing worth compiling.
    steps = settings["epochs"] * (len(d.images) // settings["batch_size"])
    student = model if cached else train.compiled(model, train.resolve_compile(
        cfg.compile, rt.device, steps * settings["batch_size"]))
    loss_fn = distillation_loss_fn(student, d.teacher, view, settings["temperature"], cfg.alpha, known, table, features)
    return loss_fn, train.val_top1(model, d.task.val, rt, d.image_size, val_features)


def distill(cfg: DistillConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
            task: data.TaskData | None = None) -> dict:
    """Distil `teacher` (a classifier checkpoint) into a `student` on `cfg.data`'s training images
    with labels hidden (SimCLR v2 section 2.3; seed paper Study 2). Settings left as None come from
    PRESETS[preset]; dense_layers None means (256,) in frozen mode and none otherwise.

    Returns dict(student={val, test reports vs ground truth}, teacher={val, test}, agreement={val, test},
    best=<best.pt path>, ...); best.pt is the student with the best val top-1 (never the test split),
    loadable by checkpoints.load_classifier."""
    settings, dense_layers = resolve_settings(cfg)
    rt = train.runtime(cfg.device, cfg.precision)
    train.seed_everything(cfg.seed)
    d = load_data(cfg, settings["batch_size"], rt.device, task)
    model, arch = load_student(cfg, dense_layers, d, rt.device)
    run = checkpoints.RunFolder(out, resume=resume, overwrite=overwrite)
    # The student sees the kind of views its teacher's encoder was pretrained on.
    pretrain_augmentation = checkpoints.pretrain_augmentation(d.teacher_ckpt)
    augmentation = student_views(cfg, settings, pretrain_augmentation, d.image_size)
    config = dict(stage="distill", **dataclasses.asdict(cfg), effective=settings, task=d.task.name,
                  image_size=d.image_size, cifar_stem_resolved=arch["cifar_stem"],
                  dense_layers_resolved=list(dense_layers), soft_labels_effective=soft_labels_used(cfg, augmentation),
                  cached_base_features=caches_base_features(cfg, augmentation),
                  augmentation=augmentation.describe() if augmentation else "none",
                  pretrain_augmentation=pretrain_augmentation,
                  distillation_images=len(d.images), known_labels=int((d.known >= 0).sum()),
                  data_seed_resolved=d.data_seed,
                  device_resolved=str(rt.device), precision_resolved=rt.precision)
    run.start(config)
    announce(config)

    frozen_state = {k: v.clone() for k, v in model.encoder.state_dict().items()} if cfg.mode == "frozen" else None
    loss_fn, evaluate = distillation_objective(cfg, settings, model, d, augmentation, rt)
    loader = data.BatchLoader(d.images, settings["batch_size"], rt.device, shuffle=True, drop_last=True,
                              seed=cfg.seed)
    schedule = train.Schedule(epochs=settings["epochs"], lr=settings["lr"], optimizer=settings["optimizer"],
                              momentum=settings["momentum"], weight_decay=settings["weight_decay"],
                              log_every=cfg.log_every)
    meta = dict(kind="distill", arch=arch, classes=d.task.classes, image_size=d.image_size,
                config=json.dumps(config, default=str),
                **checkpoints.carried(student_pretrain_augmentation(cfg, pretrain_augmentation)))
    train.fit(model, loss_fn, loader, run, schedule, rt, seed=cfg.seed, meta=meta, evaluate=evaluate,
              select="val_top1", desc=f"distill {cfg.mode} {cfg.student}")
    if frozen_state is not None:
        train.check_frozen(frozen_state, model.encoder)
    return report(run, cfg, d.task, d.teacher, rt, d.image_size, config["augmentation"])


def report(run: checkpoints.RunFolder, cfg: DistillConfig, task: data.TaskData, teacher_model: nn.Module,
           rt: train.Runtime, image_size: int, augmentation: str) -> dict:
    """The best student (best.pt) and the teacher on val and test, and how often they agree;
    written to results.json and printed."""
    best, _ = checkpoints.load_classifier(run.path / "best.pt", task.num_classes)
    best = best.to(rt.device)
    result = dict(task=task.name, mode=cfg.mode, student_arch=cfg.student, teacher_path=str(cfg.teacher),
                  augmentation=augmentation, best=str(run.path / "best.pt"), student={}, teacher={}, agreement={})
    for split_name, split in (("val", task.val), ("test", task.test)):
        for who, net in (("student", best), ("teacher", teacher_model)):
            result[who][split_name] = train.evaluate_classifier(net, split, rt, size=image_size)
        result["agreement"][split_name] = agreement(result["student"][split_name].pop("predictions"),
                                                    result["teacher"][split_name].pop("predictions"))
    checkpoints.atomic_write_text(json.dumps(result, indent=2) + "\n", run.path / "results.json")
    print(f"distill {task.name} ({cfg.mode} {cfg.student}): student test top-1 {result['student']['test']['top1']:.4f} "
          f"(val {result['student']['val']['top1']:.4f}), teacher test top-1 {result['teacher']['test']['top1']:.4f}, "
          f"agreement {result['agreement']['test']:.4f}; best: {result['best']}", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=options.HelpFormatter,
                                epilog="presets: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    options.add_options(p, DistillConfig)
    options.add_run(p)
    return p


def run_command(args: argparse.Namespace) -> None:
    distill(options.from_args(DistillConfig, args), args.out, resume=args.resume, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    return train.main(argv, run=run_command, parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
