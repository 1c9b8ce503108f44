"""SimCLR pretraining, evaluation and fine-tuning: stages 1 and 2 of the SimCLR v2 recipe.

    pretrain     task-agnostic contrastive pretraining (SimCLR v1 Alg. 1, v2 section 2.1)
    linear-eval  frozen encoder, features computed once, a linear classifier on top (v1 section 4)
    knn          weighted kNN on frozen features: every training image votes for the test images; with
                 it, alignment, uniformity and the contrastive task's top-1, of h and of z
    finetune     supervised fine-tuning from a middle layer of the projection head (v2 section 2.2)
    bench        throughput: network alone, augmentation alone, end to end

The engine these stages share with distill.py and transfer.py (devices and precision, the training
loop, evaluation) lives in train.py; run folders and checkpoints in checkpoints.py; the options and
their checks in options.py; LARS and the schedule in optim.py.

Command line:  python simclr.py pretrain --data shapes-pool --out runs/pretrain
               python simclr.py linear-eval --checkpoint runs/pretrain/checkpoint.pt --data shapes5
               python simclr.py knn --checkpoint runs/pretrain/checkpoint.pt --data cifar10
               python simclr.py finetune --checkpoint runs/pretrain/checkpoint.pt --data shapes5 --fraction 0.1
               python simclr.py finetune --checkpoint encoders/resnet18-w0.125-seed0.pt --from-scratch ...
               python simclr.py bench --width 0.125 --batch 256 --precision both
               torchrun --nproc_per_node 2 simclr.py pretrain ...   (several GPUs, or CPU processes)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import checkpoints
import data
import losses
import models
import optim
import options
import train
from options import UserError, option


# ----------------------------------------------------------------------------------------------
# The SimCLR step: two views of every image, one forward pass, NT-Xent


def contrastive_loss_fn(model: nn.Module, augmentation: augment.SimCLRAugment, temperature: float,
                        distributed: train.Distributed):
    """The SimCLR step's loss: two augmented views, one forward pass of both, NT-Xent.

    Both views go through the network as one batch of 2B, so batch norm sees both (as SimCLR's
    global BN does) and the GPU gets one large batch instead of two."""
    loss = losses.nt_xent_global if distributed.world_size > 1 else losses.nt_xent

    def loss_fn(x: torch.Tensor, y, generator: torch.Generator) -> torch.Tensor:
        views = torch.cat([augmentation(x, generator), augmentation(x, generator)])
        if views.is_cuda:
            views = views.contiguous(memory_format=torch.channels_last)
        _, z = model(views)
        z1, z2 = z.float().chunk(2)
        return loss(z1, z2, temperature, check_finite=False)
    return loss_fn


# ----------------------------------------------------------------------------------------------
# Stage 1: pretraining


@dataclass
class EncoderOptions:
    """The network that pretraining trains and bench times."""
    model: str = option("resnet18", "encoder (models.py)", choices=models.MODEL_NAMES)
    width: float = option(1.0, "channel multiplier (SimCLR 2x, 4x; 0.25 for CPU)", allowed=options.POSITIVE)


@dataclass
class PretrainConfig(EncoderOptions, train.OptimiserOptions, train.LoopOptions, options.StageConfig):
    """Every setting of a pretraining run. Defaults follow the official CIFAR command up to 64 px and
    the ImageNet settings above; None means 'choose by image size' (train.PRETRAIN_DEFAULTS, filled in
    by `resolve_defaults`)."""
    data: str = option("shapes-pool", "unlabeled images: shapes-pool, a folder, or a dataset name")
    eval_data: str | None = option("shapes5", "labeled task for the kNN monitor, its train split the bank and its "
                                   "val split the queries ('' for none)")
    eval_images: int | None = option(None, "train images of an embedded --eval-data (10%% become its val queries); "
                                     "None: its default", allowed=options.POSITIVE)
    image_size: int = option(32, "working resolution in pixels", allowed=options.POSITIVE)
    n_images: int | None = option(None, "pool size (generated) or cap (folder)", allowed=options.POSITIVE)
    cifar_stem: bool | None = option(None, f"3x3 stem, no max-pool (default: {train.default_by_size('cifar_stem')})")
    head_layers: int = option(2, "2 (SimCLR v1) or 3 (v2)", allowed=options.AT_LEAST_1)
    head_hidden: int | None = option(None, "head width (default: the encoder's feature width)",
                                     allowed=options.AT_LEAST_1)
    out_dim: int = option(128, "projection size z (the loss's input)", allowed=options.AT_LEAST_1)
    epochs: int = option(100, "passes over the unlabeled images", allowed=options.POSITIVE)
    batch_size: int = option(512, "global batch (all processes)", allowed=options.POSITIVE)
    optimizer: str = options.override(train.OptimiserOptions, "optimizer", "lars")  # SimCLR's (v1 section 2.2)
    base_lr: float | None = option(None, f"scaled by batch/256 (default: {train.default_by_size('base_lr')})",
                                   allowed=options.POSITIVE)
    lr_scaling: str = option("linear", "lr = base-lr x batch/256 (linear) or base-lr x sqrt(batch) (sqrt; SimCLR v2 "
                             "uses 0.075)", choices=["linear", "sqrt"])
    # Not OptimiserOptions' 0: SimCLR's weight decay depends on the image size.
    weight_decay: float | None = option(None, f"default: {train.default_by_size('weight_decay')}",
                                        allowed=options.NON_NEGATIVE)
    warmup_epochs: float | None = option(None, "default: 10, at most a tenth of the run", allowed=options.NON_NEGATIVE)
    temperature: float = option(0.5, "NT-Xent temperature", allowed=options.POSITIVE)
    strength: float | None = option(None, f"colour distortion strength (default: {train.default_by_size('strength')})",
                                    allowed=options.NON_NEGATIVE)
    grayscale: float = option(augment.SimCLRAugment.GRAYSCALE_P, "probability that a view is turned gray, after "
                              "the colour jitter (SimCLR: 0.2)", allowed=options.UNIT)
    crop_min_scale: float = option(train.PRETRAIN_CROP_MIN_SCALE, "smallest random-crop area as a fraction of the image (SimCLR: 0.08)",
                                   allowed=options.FRACTION)
    blur: bool | None = option(None, f"Gaussian blur (default: {train.default_by_size('blur')})")
    knn_every: int = option(10, "epochs between kNN monitor evaluations", allowed=options.AT_LEAST_1)
    knn_k: int = option(200, "neighbours of the kNN monitor", allowed=options.AT_LEAST_1)
    checkpoint_every: int = option(0, "steps between checkpoints (0: each epoch)", allowed=options.NON_NEGATIVE)
    release: str | None = option(None, "also write the final encoder and head, without optimiser state, to this "
                                 "file (a released encoder: see RESULTS.md), with the run's log beside it as "
                                 "FILE.log.jsonl")
    # Not an option: lets runs with different training seeds share one pool (run_all.py's student bases).
    data_seed: int | None = None


def resolve_defaults(cfg: PretrainConfig) -> PretrainConfig:
    """A copy of cfg with every option left as None chosen: by image size (train.PRETRAIN_DEFAULTS),
    and the warm-up by the run's length."""
    by_size = train.pretrain_defaults(cfg.image_size)
    cfg = dataclasses.replace(cfg, eval_data=cfg.eval_data or None,
                              **{name: value for name, value in by_size.items() if getattr(cfg, name) is None})
    if cfg.warmup_epochs is None:
        cfg.warmup_epochs = min(10.0, cfg.epochs / 10)
    return cfg


def pretrain(cfg: PretrainConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> dict:
    """SimCLR pretraining (v1 Algorithm 1 with v2's deeper head); returns a summary dict with the
    checkpoint path, the history of kNN checks (representation_report's numbers every --knn-every
    epochs) and the final kNN accuracy of the learned and of a random encoder."""
    cfg = resolve_defaults(cfg)
    options.validate(cfg)
    train.check_batch_for_batch_norm(cfg.batch_size)
    rt = train.runtime(cfg.device, cfg.precision)
    distributed = train.init_distributed(rt.device)
    run = checkpoints.RunFolder(out, resume=resume, overwrite=overwrite, is_main=distributed.is_main)
    train.seed_everything(cfg.seed)
    loader = pretraining_batches(cfg, rt, distributed)
    arch = dict(encoder=cfg.model, width=cfg.width, cifar_stem=cfg.cifar_stem, head_layers=cfg.head_layers,
                head_hidden=cfg.head_hidden, out_dim=cfg.out_dim)
    model = simclr_model(arch, rt, distributed)
    augmentation = augment.SimCLRAugment(cfg.image_size, crop=True, flip=True, color=True, blur=cfg.blur,
                                         strength=cfg.strength, scale=(cfg.crop_min_scale, 1.0),
                                         grayscale=cfg.grayscale)
    images_seen = cfg.epochs * len(loader) * cfg.batch_size
    step_model = train.compiled(model, train.resolve_compile(cfg.compile, rt.device, images_seen))
    loss_fn = contrastive_loss_fn(step_model, augmentation, cfg.temperature, distributed)
    lr = optim.scaled_lr(cfg.base_lr, cfg.batch_size, cfg.lr_scaling)
    schedule = train.Schedule(epochs=cfg.epochs, lr=lr, optimizer=cfg.optimizer, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
                              log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                              eval_every=cfg.knn_every)
    config = dict(stage="pretrain", **asdict(cfg), effective_lr=lr, world_size=distributed.world_size,
                  device_resolved=str(rt.device), precision_resolved=rt.precision, images=len(loader.images),
                  steps_per_epoch=len(loader), augmentation=augmentation.describe(), torch=torch.__version__)
    run.start(config)
    if distributed.is_main:
        _announce_pretraining(cfg, rt, distributed, lr, augmentation, loader)
    knn = knn_monitor_for(cfg, rt, augmentation) if distributed.is_main else None
    plain_model = train.unwrap(model)
    meta = dict(kind="pretrain", arch=arch, config=json.dumps(config, default=str), image_size=cfg.image_size,
                mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    history = train.fit(model, loss_fn, loader, run, schedule, rt, seed=cfg.seed, meta=meta,
                        evaluate=(lambda: knn(plain_model)) if knn else None,
                        distributed=distributed, desc="pretrain")
    summary = dict(checkpoint=str(run.checkpoint), history=history)
    if cfg.release and distributed.is_main:
        summary["released"] = release_encoder(run, cfg.release)
    if knn is not None:
        _knn_summary(summary, knn, plain_model, arch, cfg, rt, run)
    return summary


def data_seed(cfg: PretrainConfig | FinetuneConfig) -> int:
    """The seed of a run's images and splits: --data-seed, else --seed. A separate data seed lets runs
    with different training seeds share one pool and one task (run_all.py's student bases and studies)."""
    return cfg.seed if cfg.data_seed is None else cfg.data_seed


def pretraining_batches(cfg: PretrainConfig, rt: train.Runtime, distributed: train.Distributed) -> data.BatchLoader:
    """The unlabeled images, in this process's share of each global batch of cfg.batch_size."""
    pool = data.load_unlabeled(cfg.data, image_size=cfg.image_size, n=cfg.n_images, root=cfg.root,
                               seed=data_seed(cfg), cache_dir=cfg.cache_dir, skip_bad=cfg.skip_bad)
    if cfg.batch_size % distributed.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} must divide evenly among {distributed.world_size} processes.")
    if cfg.batch_size > len(pool):
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the dataset '{cfg.data}' "
                        f"({len(pool)} images). Use a batch of at most {len(pool)}.")
    return data.BatchLoader(pool, cfg.batch_size // distributed.world_size, rt.device, shuffle=True, drop_last=True,
                            seed=cfg.seed, rank=distributed.rank, world_size=distributed.world_size)


def simclr_model(arch: dict, rt: train.Runtime, distributed: train.Distributed) -> nn.Module:
    """Encoder + projection head on the device; across processes, with SimCLR's global batch norm."""
    model = checkpoints.build_simclr_model(arch).to(rt.device)
    if rt.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if distributed.world_size > 1:
        if rt.device.type == "cuda":
            # SimCLR's global BN: statistics over all ranks' views, so no rank can find the positive
            # from batch-local statistics (v1 section 2.3).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                                    else None)
    return model


def _announce_pretraining(cfg: PretrainConfig, rt: train.Runtime, distributed: train.Distributed, lr: float,
                          augmentation: augment.SimCLRAugment, loader: data.BatchLoader) -> None:
    print(f"pretrain: {cfg.model} (width {cfg.width}, {'CIFAR' if cfg.cifar_stem else 'ImageNet'} stem, "
          f"{cfg.head_layers}-layer head) on {len(loader.images)} images of {cfg.image_size}px, device {rt.device}, "
          f"{rt.precision}, world {distributed.world_size}; {cfg.optimizer} lr {lr:.4g} (= {cfg.base_lr} x "
          f"{cfg.batch_size}/256), wd {cfg.weight_decay}, warm-up {cfg.warmup_epochs} epochs, T {cfg.temperature}, "
          f"augment {augmentation.describe()}, {cfg.epochs} epochs x {len(loader)} steps", file=sys.stderr)


def knn_monitor_for(cfg: PretrainConfig, rt: train.Runtime, views: augment.SimCLRAugment) -> KnnCheck | None:
    """The kNN check of a pretraining run on cfg.eval_data (train votes for val), its diagnostics on the
    run's own `views`, or None without an eval task."""
    if not cfg.eval_data:
        return None
    # A generated task can be as large as wanted: a 100-image val split measures kNN accuracy to about
    # +-5 points, too coarse to tell a short pretraining from a random encoder.
    eval_size = dict(n_train=cfg.eval_images) if cfg.eval_images and cfg.eval_data in data.EMBEDDED_TASKS else {}
    task = data.load_task(cfg.eval_data, image_size=cfg.image_size, root=cfg.root,
                          seed=data_seed(cfg), cache_dir=cfg.cache_dir,
                          skip_bad=cfg.skip_bad, **eval_size)
    return KnnCheck(task, rt, cfg.knn_k, cfg.image_size, views)


@dataclass
class KnnCheck:
    """pretrain's kNN check: called with the SimCLR model, representation_report of its h and z with
    the task's train split as the bank, its val split as the queries, on the pretraining views."""
    task: data.TaskData
    rt: train.Runtime
    k: int
    size: int
    views: augment.SimCLRAugment

    def __call__(self, model: models.SimCLRModel) -> dict[str, float]:
        return representation_report(model, self.task.train, self.task.val, self.rt, self.k, self.size, self.views)


def _knn_summary(summary: dict, knn: KnnCheck, model: models.SimCLRModel, arch: dict,
                 cfg: PretrainConfig, rt: train.Runtime, run: checkpoints.RunFolder) -> None:
    """The final check beside a random encoder's, into summary (and summary.json)."""
    history = summary["history"]
    final = {k: v for k, v in history[-1].items() if k not in ("epoch", "step")} if history else knn(model)
    random = knn(random_model(arch, cfg.seed).to(rt.device))
    summary.update(knn_top1=final["knn_top1"], knn_top1_random_encoder=random["knn_top1"], random_encoder=random,
                   diagnostics=diagnostic_settings(knn.task.val, knn.views))
    print(f"kNN (k={cfg.knn_k}) top-1 on {cfg.eval_data} val: pretrained {summary['knn_top1']:.4f}, "
          f"random encoder {summary['knn_top1_random_encoder']:.4f}", file=sys.stderr)
    print("\n".join(diagnostics_table(f"{cfg.eval_data} val", summary["diagnostics"],
                                      {"pretrained": final, "random encoder": random})), file=sys.stderr)
    checkpoints.atomic_write_text(json.dumps(summary, indent=2) + "\n", run.path / "summary.json")


def release_encoder(run: checkpoints.RunFolder, path: str | os.PathLike) -> str:
    """Copy a finished run's encoder and projection head into a small pretraining checkpoint: no
    optimiser state, RNG or data position (those only matter to --resume), so it is about a third of
    checkpoint.pt and its bytes depend only on the training. The run's log goes beside it."""
    ckpt = checkpoints.load_checkpoint(run.checkpoint)
    keep = ("kind", "format", "arch", "model", "image_size", "mean", "std", "config", "history")
    checkpoints.atomic_save({k: ckpt[k] for k in keep}, path)
    checkpoints.atomic_write_text((run.path / "log.jsonl").read_text(), f"{path}.log.jsonl")
    print(f"released encoder: {path} ({os.path.getsize(path) / 2**20:.1f} MiB), log {path}.log.jsonl", file=sys.stderr)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Evaluation: the kNN monitor


@torch.no_grad()
def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> float:
    """Weighted kNN top-1 (Wu et al. 2018, the usual SSL monitor): cosine similarity to the bank,
    the k nearest vote for their class with weight exp(sim / temperature)."""
    bank = F.normalize(bank, dim=1)
    query = F.normalize(query, dim=1)
    k = min(k, len(bank))
    correct = 0
    for i in range(0, len(query), chunk):
        sim, idx = (query[i:i + chunk] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == query_labels[i:i + chunk]).sum()
    return float(correct) / len(query)


def knn_monitor(encoder: nn.Module, bank: data.ImageSet | Sequence[data.ImageSet], queries: data.ImageSet,
                rt: train.Runtime, k: int = 200, size: int | None = None) -> float:
    """kNN accuracy of `encoder`'s features: the bank images (one set, or several whose features are
    joined) vote for the query images (pretraining's monitor: train votes for val)."""
    bank = [bank] if isinstance(bank, data.ImageSet) else list(bank)
    was_training = encoder.training
    encoder.eval()
    features = lambda sets: torch.cat([train.extract_features(  # noqa: E731
        encoder, s, rt, size=size) for s in sets])
    labels = lambda sets: torch.as_tensor(np.concatenate([np.asarray(s.labels) for s in sets]),  # noqa: E731
                                          device=rt.device, dtype=torch.long)
    accuracy = knn_accuracy(features(bank), labels(bank), features([queries]), labels([queries]),
                            len(queries.classes), k=k)
    encoder.train(was_training)
    return accuracy


def random_model(arch: dict, seed: int) -> models.SimCLRModel:
    """The reference for what pretraining adds: an untrained encoder and head of the same architecture,
    seeded from seed + 1, so that pretrain's kNN check, run_all's check of a released encoder and its
    Study 3 random-encoder row all compare with the same network."""
    torch.manual_seed(seed + 1)
    return checkpoints.build_simclr_model(arch)


def random_encoder(arch: dict, seed: int) -> nn.Module:
    """random_model's encoder."""
    return random_model(arch, seed).encoder


# ----------------------------------------------------------------------------------------------
# Evaluation: inside the representation, h and z (kNN, alignment, uniformity, the contrastive task)
#
# Small encoders can solve the contrastive task and still over-cluster their representation (Shi et
# al., AAAI 2022), so pretrain's kNN check and the knn command also measure, for h and z, how close
# two views of an image lie, how evenly the images spread and how often the task is solved
# (losses.alignment, uniformity, contrastive_top1). The views are the encoder's own pretraining
# views (its task), of a fixed subset, drawn from a fixed seed, so that the numbers compare between
# epochs, and between runs pretrained on the same views, on one device type:

DIAGNOSTIC_IMAGES = 2048  # at most this many query images, two views each (~8% of a CIFAR-10 check's images)
CONTRASTIVE_BATCH = 256   # N of the contrastive top-1: 2N - 1 = 511 candidates, as pretraining at batch 256
VIEW_SEED = 0             # draws the subset and the views, whatever the run's --seed


def pretraining_views(ckpt: dict, source: str | os.PathLike | None = None,
                      stage: str = "knn") -> augment.SimCLRAugment:
    """The views the encoder of a pretraining checkpoint was trained on: its recorded crop floor, colour
    strength, grayscale probability and blur; SimCLR's defaults for its image size where it records
    none (train.matched_views says so, naming `source`)."""
    size = int(ckpt["image_size"])
    try:
        config = json.loads(ckpt["config"]) if isinstance(ckpt.get("config"), str) else ckpt.get("config")
    except ValueError:
        config = None
    blur = config.get("blur") if isinstance(config, dict) else None
    return train.matched_views(checkpoints.pretrain_augmentation(ckpt), size, crop=True, flip=True, color=True,
                               blur=train.pretrain_defaults(size)["blur"] if blur is None else bool(blur),
                               source=source, stage=stage)


def diagnostic_subset(queries: data.ImageSet) -> tuple[data.ImageSet, int]:
    """(the images the diagnostics view, N): the queries, or DIAGNOSTIC_IMAGES of them drawn with
    VIEW_SEED, cut to whole batches of N = CONTRASTIVE_BATCH (N = all of them when fewer)."""
    kept = min(len(queries), DIAGNOSTIC_IMAGES)
    batch = min(kept, CONTRASTIVE_BATCH)
    kept -= kept % batch
    if kept == len(queries):
        return queries, batch
    chosen = np.random.default_rng(VIEW_SEED).choice(len(queries), kept, replace=False)
    return queries.subset(np.sort(chosen)), batch


def diagnostic_settings(queries: data.ImageSet, views: augment.SimCLRAugment) -> dict:
    """What representation_report's view numbers were measured on, for a report to state."""
    images, batch = diagnostic_subset(queries)
    return dict(images=len(images), contrastive_batch=batch, view_seed=VIEW_SEED, views=views.describe())


def _h_and_z(model: models.SimCLRModel, images: data.ImageSet, rt: train.Runtime,
             size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, z) of every image, un-augmented (extract_features), each (N, D) float32 on the device."""
    both = train.extract_features(lambda x: torch.cat(model(x), dim=1), images, rt, size=size)
    return both[:, :model.encoder.feature_dim], both[:, model.encoder.feature_dim:]


def _view_metrics(model: models.SimCLRModel, images: data.ImageSet, batch: int, rt: train.Runtime,
                  views: augment.SimCLRAugment) -> dict[str, torch.Tensor]:
    """alignment, uniformity and contrastive top-1 of h and z on two views of each image, one
    contrastive batch of `batch` images per forward pass; device tensors (read once by the caller)."""
    generator = torch.Generator(device=rt.device).manual_seed(VIEW_SEED)
    first, second = {"h": [], "z": []}, {"h": [], "z": []}
    for x, _ in images.batches(batch, rt.device).epoch(0):
        with rt.autocast():
            h, z = model(torch.cat([views(x, generator), views(x, generator)]))
        for name, features in (("h", h), ("z", z)):
            a, b = features.float().chunk(2)
            first[name].append(a)
            second[name].append(b)
    metrics = {}
    for name in ("h", "z"):
        a, b = torch.cat(first[name]), torch.cat(second[name])
        metrics[f"alignment_{name}"] = losses.alignment(a, b)
        # Wang & Isola's uniformity of a pair of views: the mean of each view's.
        metrics[f"uniformity_{name}"] = ((losses.uniformity(a) + losses.uniformity(b)) / 2 if len(a) > 1
                                         else a.new_tensor(float("nan")))
        metrics[f"contrastive_top1_{name}"] = losses.contrastive_top1(a.view(-1, batch, a.shape[1]),
                                                                      b.view(-1, batch, b.shape[1]))
    return metrics


@torch.no_grad()
def representation_report(model: models.SimCLRModel, bank: data.ImageSet | Sequence[data.ImageSet],
                          queries: data.ImageSet, rt: train.Runtime, k: int = 200, size: int | None = None,
                          views: augment.SimCLRAugment | None = None) -> dict[str, float]:
    """What pretrain's kNN check and the knn command measure, for h (the encoder's output) and z (the
    head's), in eval mode:

      knn_top1, knn_top1_z    weighted kNN (knn_accuracy): the bank votes for the un-augmented queries;
                              knn_top1 is knn_monitor's score;
      alignment_h, _z         losses.alignment of two views of each image (lower: views closer);
      uniformity_h, _z        losses.uniformity over the images, the mean of both views (lower: more
                              spread; 0: one point);
      contrastive_top1_h, _z  losses.contrastive_top1 in batches of N images (2N - 1 candidates).

    The views are `views` (the encoder's pretraining views; None: SimCLR's defaults for the image
    size) of diagnostic_subset(queries), drawn with VIEW_SEED on the device, so each call sees the
    same images and views (diagnostic_settings says which)."""
    bank = [bank] if isinstance(bank, data.ImageSet) else list(bank)
    size = size or queries.image_size
    if views is None:
        views = train.matched_views(None, size, crop=True, flip=True, color=True,
                                    blur=train.pretrain_defaults(size)["blur"])
    was_training = model.training
    model.eval()
    bank_h, bank_z = (torch.cat(f) for f in zip(*(_h_and_z(model, s, rt, size) for s in bank)))
    query_h, query_z = _h_and_z(model, queries, rt, size)
    labels = lambda sets: torch.as_tensor(np.concatenate([np.asarray(s.labels) for s in sets]),  # noqa: E731
                                          device=rt.device, dtype=torch.long)
    bank_labels, query_labels = labels(bank), labels([queries])
    report = {name: knn_accuracy(b, bank_labels, q, query_labels, len(queries.classes), k=k)
              for name, b, q in (("knn_top1", bank_h, query_h), ("knn_top1_z", bank_z, query_z))}
    metrics = _view_metrics(model, *diagnostic_subset(queries), rt, views)
    order = [f"{metric}_{name}" for metric in ("alignment", "uniformity", "contrastive_top1") for name in ("h", "z")]
    report.update(zip(order, torch.stack([metrics[key] for key in order]).tolist()))
    model.train(was_training)
    return report


def diagnostics_table(where: str, settings: dict, reports: dict[str, dict]) -> list[str]:
    """representation_report's numbers as printed lines: a heading, then a row for h and for z of each
    named report (e.g. {"pretrained": ..., "random encoder": ...})."""
    n = settings["contrastive_batch"]
    lines = [f"Inside the representation on {where}, two views of {settings['images']:,} images ({settings['views']}, "
             f"view seed {settings['view_seed']}): alignment (lower: views closer), uniformity (lower: more spread; "
             f"0: one point), contrastive top-1 (the other view nearest among 2N-1 = {2 * n - 1}, N = {n})",
             f"  {'':30} {'kNN top-1':>9}  {'alignment':>9}  {'uniformity':>10}  {'contrastive top-1':>17}"]
    for name, r in reports.items():
        for rep, what in (("h", "encoder"), ("z", "head")):
            knn = r["knn_top1" if rep == "h" else "knn_top1_z"]
            lines.append(f"  {f'{rep} ({what}), {name}':30} {knn:9.4f}  {r[f'alignment_{rep}']:9.4f}  "
                         f"{r[f'uniformity_{rep}']:10.4f}  {r[f'contrastive_top1_{rep}']:17.4f}")
    return lines


# ----------------------------------------------------------------------------------------------
# Evaluation: linear evaluation and the knn command


def _split_size(split: str):
    """The option that sizes a labeled task's train or test split (linear-eval and finetune)."""
    what = ("size of the task's train split before 10%% become val (embedded: generated, real data: a seeded "
            "subsample); None: the task's own" if split == "train" else "size of the task's test split, the same way")
    return option(None, what, allowed=options.AT_LEAST_1)


@dataclass
class CheckpointTaskConfig(options.StageConfig):
    """What a stage that starts from a pretraining checkpoint reads (linear-eval, knn, finetune): the
    checkpoint and a labeled task."""
    checkpoint: str | None = option(None, "a pretraining checkpoint.pt", required=True)
    data: str = option("shapes5", "labeled task: an embedded name, a dataset name or a folder")
    train_images: int | None = _split_size("train")
    test_images: int | None = _split_size("test")


@dataclass
class LinearEvalConfig(CheckpointTaskConfig):
    """Linear evaluation of a pretraining checkpoint on a labeled task."""
    epochs: int = option(100, "epochs of the linear layer on cached features", allowed=options.POSITIVE)
    lr: float = option(0.1, "learning rate (SGD, momentum 0.9, cosine)", allowed=options.POSITIVE)
    batch_size: int = option(256, "batch of cached features", allowed=options.POSITIVE)
    head_layer: int = option(0, "0: encoder output; k: after head layer k", allowed=options.NON_NEGATIVE)


def linear_eval(cfg: LinearEvalConfig, out: str | os.PathLike | None = None, resume: bool = False,
                overwrite: bool = False) -> dict:
    """Linear evaluation (SimCLR v1 section 4): frozen encoder, features of the un-augmented train,
    val and test images computed once, a linear layer trained on them; top-1/top-5 on val and test."""
    options.validate(cfg)
    rt = train.runtime(cfg.device, cfg.precision)
    run = checkpoints.RunFolder.redo(out, "linear-eval", resume, overwrite) if out is not None else None  # before any work
    train.seed_everything(cfg.seed)
    model, ckpt = checkpoints.load_pretrained(cfg.checkpoint)
    task = data.load_task(cfg.data, image_size=ckpt["image_size"], root=cfg.root, seed=cfg.seed,
                          cache_dir=cfg.cache_dir, skip_bad=cfg.skip_bad, n_train=cfg.train_images,
                          n_test=cfg.test_images)
    classifier = models.Classifier(model.encoder, model.head, cfg.head_layer, task.num_classes, ckpt["mean"],
                                   ckpt["std"]).to(rt.device)
    reports = train.linear_probe(classifier, task, rt, ckpt["image_size"], epochs=cfg.epochs,
                                 batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    result = dict(task=task.name, checkpoint=str(cfg.checkpoint), head_layer=cfg.head_layer, **reports)
    print(f"linear eval on {task.name}: val top-1 {result['val']['top1']:.4f}, test top-1 {result['test']['top1']:.4f}",
          file=sys.stderr)
    if run is not None:
        run.start(dict(stage="linear-eval", **asdict(cfg), task=task.name,
                       split_sizes=dict(train=len(task.train), val=len(task.val), test=len(task.test)),
                       device_resolved=str(rt.device), precision_resolved=rt.precision))
        arch = checkpoints.classifier_arch(ckpt["arch"], cfg.head_layer, task.num_classes, ckpt["mean"], ckpt["std"])
        run.save(dict(kind="linear-eval", format=checkpoints.CHECKPOINT_FORMAT, arch=arch, model=classifier.state_dict(),
                      classes=task.classes, image_size=ckpt["image_size"],
                      **checkpoints.carried(checkpoints.pretrain_augmentation(ckpt))), "best.pt")
        checkpoints.atomic_write_text(json.dumps(result, indent=2) + "\n", run.path / "results.json")
    return result


@dataclass
class KnnConfig(CheckpointTaskConfig):
    """kNN evaluation of a pretraining checkpoint on a labeled task's test (or val) split."""
    split: str = option("test", "queries: test (bank: every training image, val included) or val (bank: train)",
                        choices=["test", "val"])
    k: int = option(200, "neighbours that vote", allowed=options.AT_LEAST_1)


def knn_eval(cfg: KnnConfig) -> dict:
    """Weighted kNN top-1 (knn_monitor: k neighbours, temperature 0.1, as during pretraining) of the
    encoder's features h on the task's test split with every training image (train and val)
    as the bank, or on val with train as the bank; beside random_encoder(arch, seed)'s score, which
    is pretrain's reference when --seed is the pretraining seed. With it, the rest of
    representation_report (kNN of z, alignment, uniformity and the contrastive task's top-1 of h and
    z on the query split, on the encoder's pretraining views) for both: printed as a table, and
    returned (the random model's under 'random_encoder')."""
    options.validate(cfg)
    rt = train.runtime(cfg.device, cfg.precision)
    model, ckpt = checkpoints.load_pretrained(cfg.checkpoint)
    size = int(ckpt["image_size"])
    task = data.load_task(cfg.data, image_size=size, root=cfg.root, seed=cfg.seed, cache_dir=cfg.cache_dir,
                          skip_bad=cfg.skip_bad, n_train=cfg.train_images, n_test=cfg.test_images)
    bank_sets, queries = ([task.train, task.val], task.test) if cfg.split == "test" else ([task.train], task.val)
    views = pretraining_views(ckpt, cfg.checkpoint)
    reports = {name: representation_report(m.to(rt.device), bank_sets, queries, rt, cfg.k, size, views)
               for name, m in (("pretrained", model), ("random encoder", random_model(ckpt["arch"], cfg.seed)))}
    n_bank = sum(len(s) for s in bank_sets)
    settings = diagnostic_settings(queries, views)
    result = dict(task=task.name, checkpoint=str(cfg.checkpoint), split=cfg.split, k=cfg.k, bank_images=n_bank,
                  query_images=len(queries), **reports["pretrained"],
                  knn_top1_random_encoder=reports["random encoder"]["knn_top1"],
                  random_encoder=reports["random encoder"], diagnostics=settings)
    print(f"kNN (k {cfg.k}) on {task.name} {cfg.split} ({len(queries):,} images; bank: {n_bank:,} training "
          f"images): top-1 {result['knn_top1']:.4f}, random encoder {result['knn_top1_random_encoder']:.4f}")
    print("\n".join(diagnostics_table(f"{task.name} {cfg.split}", settings, reports)))
    return result


# ----------------------------------------------------------------------------------------------
# Stage 2: fine-tuning from a projection-head layer


@dataclass
class FinetuneConfig(CheckpointTaskConfig, train.MatchedViewOptions, train.OptimiserOptions, train.LoopOptions):
    """Fine-tuning from a pretraining checkpoint (SimCLR v2 section 2.2). `checkpoint=None` with
    `arch` and `image_size` trains the same network from random initialisation (a supervised baseline)."""
    from_scratch: bool = option(False, "train the checkpoint's architecture from random initialisation instead "
                                "(a supervised reference: same network, same image size, no pretraining)", flag=True)
    fraction: float = option(1.0, "fraction of training labels (0.01, 0.1, 1)", allowed=options.FRACTION)
    val_images: int | None = option(None, "keep at most this many val images (class-proportional, at least one per "
                                    "class) to pick the best epoch; the others are left out, not moved into train. "
                                    "With few labels, a val split no larger than the labeled set is honest "
                                    "(default: the whole val split)", allowed=options.AT_LEAST_1)
    head_layer: int = option(1, "fine-tune from this head layer (SimCLR v2: 1)", allowed=options.NON_NEGATIVE)
    crop: bool = option(True, "use crop augmentation while fine-tuning")
    flip: bool = option(True, "use flip augmentation while fine-tuning")
    color: bool = option(False, "use color augmentation while fine-tuning")
    blur: bool = option(False, "use blur augmentation while fine-tuning")
    epochs: int = option(30, "passes over the labeled subset", allowed=options.POSITIVE)
    batch_size: int = option(128, "labeled images per step", allowed=options.POSITIVE)
    lr: float = option(0.05, "peak learning rate (warm-up, then cosine)", allowed=options.POSITIVE)
    data_seed: int | None = option(None, "seed of the task's images and splits (default: --seed; run_all.py's "
                                   "studies draw every task from seed 0 and vary only --seed)")
    arch: dict | None = None   # the network to train from scratch when checkpoint is None
    image_size: int = 32       # its image size


def finetune(cfg: FinetuneConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
             task: data.TaskData | None = None) -> dict:
    """Supervised fine-tuning of the whole network (SimCLR v2 section 2.2) on `fraction` of the
    labels (class-balanced), from layer `head_layer` of the projection head (v2: 1 of a 3-layer head).

    Model selection: best val top-1 (best.pt); the test split is reported
    for that model only. Returns val/test reports and the best.pt path (a distillation teacher)."""
    options.validate(cfg)
    train.check_batch_for_batch_norm(cfg.batch_size)
    rt = train.runtime(cfg.device, cfg.precision)
    train.seed_everything(cfg.seed)
    start = starting_point(cfg)
    task, labeled = finetuning_data(cfg, start, task)
    run = checkpoints.RunFolder(out, resume=resume, overwrite=overwrite)
    model = models.Classifier(start.model.encoder, start.model.head, cfg.head_layer, task.num_classes, start.mean,
                              start.std).to(rt.device)
    if rt.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    augmentation = train.matched_views(start.pretrain_augmentation, start.image_size, crop=cfg.crop, flip=cfg.flip,
                                       color=cfg.color, blur=cfg.blur, crop_min_scale=cfg.crop_min_scale,
                                       strength=cfg.strength, source=cfg.checkpoint, stage="finetune")
    config = dict(stage="finetune", **asdict(cfg), pretrained=not start.scratch, arch_resolved=start.arch,
                  image_size_resolved=start.image_size, task=task.name,
                  split_sizes=dict(train=len(task.train), val=len(task.val), test=len(task.test), labeled=len(labeled)),
                  augmentation=augmentation.describe(), pretrain_augmentation=start.pretrain_augmentation,
                  device_resolved=str(rt.device), precision_resolved=rt.precision)
    run.start(config)
    loader = data.BatchLoader(labeled, cfg.batch_size, rt.device, shuffle=True, drop_last=True, seed=cfg.seed)
    schedule = train.Schedule(epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, log_every=cfg.log_every)
    # A network trained from scratch was not pretrained: it carries no record on.
    meta = dict(kind="finetune", arch=checkpoints.classifier_arch(start.arch, cfg.head_layer, task.num_classes,
                                                                  start.mean, start.std),
                classes=task.classes, image_size=start.image_size, config=json.dumps(config, default=str),
                **checkpoints.carried(None if start.scratch else start.pretrain_augmentation))
    step_model = train.compiled(model, train.resolve_compile(cfg.compile, rt.device,
                                                             cfg.epochs * len(loader) * cfg.batch_size))
    train.fit(model, train.supervised_loss_fn(step_model, augmentation), loader, run, schedule, rt, seed=cfg.seed,
              meta=meta, evaluate=train.val_top1(model, task.val, rt, start.image_size), select="val_top1",
              desc=f"finetune {task.name}")
    return _finetune_report(cfg, run, task, rt, start, augmentation)


@dataclass
class StartingPoint:
    """What fine-tuning starts from: a pretrained SimCLR model, or the same network at random."""
    model: models.SimCLRModel
    arch: dict
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    pretrain_augmentation: dict | None  # the views the encoder was pretrained on (checkpoints.pretrain_augmentation)
    scratch: bool


def starting_point(cfg: FinetuneConfig) -> StartingPoint:
    """cfg.checkpoint's pretrained model (or its architecture at random with --from-scratch), or, without
    a checkpoint, cfg.arch at random (a supervised baseline)."""
    if cfg.checkpoint is None:
        if cfg.arch is None:
            raise ValueError("finetune from scratch needs `arch`")
        return StartingPoint(checkpoints.build_simclr_model(cfg.arch), cfg.arch, cfg.image_size, (0.0, 0.0, 0.0),
                             (1.0, 1.0, 1.0), None, True)
    pretrained, ckpt = checkpoints.load_pretrained(cfg.checkpoint)
    if cfg.from_scratch:
        pretrained = checkpoints.build_simclr_model(ckpt["arch"])
    return StartingPoint(pretrained, ckpt["arch"], ckpt["image_size"], ckpt["mean"], ckpt["std"],
                         checkpoints.pretrain_augmentation(ckpt), cfg.from_scratch)


def finetuning_data(cfg: FinetuneConfig, start: StartingPoint,
                    task: data.TaskData | None) -> tuple[data.TaskData, data.ImageSet]:
    """The task (its val split cut to --val-images) and its labeled training subset at cfg.fraction."""
    task = task or data.load_task(cfg.data, image_size=start.image_size, root=cfg.root, seed=data_seed(cfg),
                                  cache_dir=cfg.cache_dir, skip_bad=cfg.skip_bad, n_train=cfg.train_images,
                                  n_test=cfg.test_images)
    if cfg.head_layer > start.arch["head_layers"]:
        raise UserError(f"--head-layer {cfg.head_layer} is deeper than the {start.arch['head_layers']}-layer "
                        "projection head.")
    if cfg.val_images is not None:
        if cfg.val_images < task.num_classes:
            raise UserError(f"--val-images {cfg.val_images} cannot hold one image of each of {task.name}'s "
                            f"{task.num_classes} classes; use at least {task.num_classes}.")
        task = dataclasses.replace(task, val=data.stratified_subset(task.val, cfg.val_images, data_seed(cfg)))
    labeled = data.labeled_fraction(task.train, cfg.fraction, cfg.seed) if cfg.fraction < 1 else task.train
    if cfg.batch_size > len(labeled):
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(labeled)} labeled training images "
                        f"of '{task.name}' at fraction {cfg.fraction}. Use a batch of at most {len(labeled)}.")
    return task, labeled


def _finetune_report(cfg: FinetuneConfig, run: checkpoints.RunFolder, task: data.TaskData, rt: train.Runtime,
                     start: StartingPoint, augmentation: augment.SimCLRAugment) -> dict:
    """The best model (best.pt) on val and test: results.json, one printed line, the returned dict."""
    result = dict(task=task.name, fraction=cfg.fraction, head_layer=cfg.head_layer,
                  augmentation=augmentation.describe(), best=str(run.path / "best.pt"),
                  **train.best_reports(run, task, rt, start.image_size))
    checkpoints.atomic_write_text(json.dumps(result, indent=2) + "\n", run.path / "results.json")
    print(f"finetune {task.name} ({'from scratch, ' if start.scratch else ''}{cfg.fraction:.0%} labels, "
          f"{augmentation.describe()}): val top-1 "
          f"{result['val']['top1']:.4f}, test top-1 {result['test']['top1']:.4f}", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------------------------
# Benchmark


def _timed(fn: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@dataclass
class BenchConfig(EncoderOptions, options.StageConfig):
    """What bench times: pretraining's step (see `bench_step`) for one network, image size and batch, on
    StageConfig's --device (its other options mean nothing here and are not flags of bench)."""
    size: int = option(32, "image size in pixels", allowed=options.Range(8))
    batch: int = option(512, "source images per step (two views each)", allowed=options.Range(2))
    steps: int = option(20, "timed steps (after 5 warm-up steps)", allowed=options.AT_LEAST_1)
    # Not LoopOptions' compile or StageConfig's precision: bench can time both settings in one run, and
    # it runs too few steps for a compile to pay back, so it stays eager unless asked.
    compile: str = option("off", "torch.compile the model", choices=["off", "on", "both"])
    precision: str = option("auto", "autocast (see pretrain --precision); both: fp32, then bf16, in one run",
                            choices=[*options.PRECISIONS, "both"])


def bench(cfg: BenchConfig) -> list[dict]:
    """bench_step's throughputs for each compile setting and precision that cfg asks for."""
    options.validate(cfg)
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[cfg.compile]
    precisions = ["fp32", "bf16"] if cfg.precision == "both" else [cfg.precision]
    return [bench_step(cfg, compile, precision) for precision in precisions for compile in compile_modes]


def bench_step(cfg: BenchConfig, compile: bool, precision: str, warmup: int = 5) -> dict:
    """Pretraining throughput in source images/s (each is two views): the network alone on batches
    already augmented, the augmentation alone, and the whole step from uint8 images on the device.
    The step is pretraining's at the image size (train.pretrain_defaults: stem, blur, colour strength,
    crops from 8%), with a 3-layer head, NT-Xent at T 0.5 and LARS; up to 64 px it is run_all.py's
    presets' on the embedded world (train.PRETRAIN_DEFAULTS['embedded']: colour strength 1.0, crops
    from 40%). The ops cost the same whatever their strengths."""
    rt = train.runtime(cfg.device, precision)
    dev, precision = rt.device, rt.precision
    torch.manual_seed(0)
    views = {"crop_min_scale": train.PRETRAIN_CROP_MIN_SCALE, **train.pretrain_defaults(cfg.size)}
    if cfg.size <= train.SMALL_IMAGE_PX:
        views.update(train.PRETRAIN_DEFAULTS["embedded"])
    arch = dict(encoder=cfg.model, width=cfg.width, cifar_stem=views["cifar_stem"], head_layers=3, head_hidden=None,
                out_dim=128)
    model = checkpoints.build_simclr_model(arch).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile else model
    optimizer = train.make_optimizer(model, "lars", 0.1, 1e-6)
    augmentation = augment.SimCLRAugment(cfg.size, blur=views["blur"], strength=views["strength"],
                                         scale=(views["crop_min_scale"], 1.0))
    images = torch.randint(0, 256, (cfg.batch, 3, cfg.size, cfg.size), dtype=torch.uint8, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    loss_fn = contrastive_loss_fn(step_model, augmentation, 0.5, train.Distributed())
    fixed_views = torch.cat([augmentation(images, g), augmentation(images, g)])

    def network_step():
        with rt.autocast():
            _, z = step_model(fixed_views)
            loss = losses.nt_xent(*z.float().chunk(2), 0.5, check_finite=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def full_step():
        with rt.autocast():
            loss = loss_fn(images, None, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def augment_only():
        augmentation(images, g), augmentation(images, g)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_net = _timed(network_step, dev, cfg.steps, warmup)
    t_aug = _timed(augment_only, dev, cfg.steps, warmup)
    t_full = _timed(full_step, dev, cfg.steps, warmup)
    n = cfg.steps * cfg.batch
    result = dict(model=cfg.model, size=cfg.size, batch=cfg.batch, width=cfg.width, device=str(dev), compile=compile,
                  precision=precision,
                  threads=torch.get_num_threads(), network_img_s=n / t_net, end_to_end_img_s=n / t_full,
                  augment_img_s=n / t_aug, ratio=t_net / t_full,
                  peak_memory_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None)
    return result


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=options.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="SimCLR contrastive pretraining", formatter_class=options.HelpFormatter)
    options.add_options(p, PretrainConfig)
    options.add_run(p)

    e = sub.add_parser("linear-eval", help="linear classifier on frozen features", formatter_class=options.HelpFormatter)
    options.add_options(e, LinearEvalConfig)
    options.add_run(e, required=False)

    k = sub.add_parser("knn", help="kNN accuracy of frozen features on a test split", formatter_class=options.HelpFormatter)
    options.add_options(k, KnnConfig)

    f = sub.add_parser("finetune", help="supervised fine-tuning from a head layer", formatter_class=options.HelpFormatter)
    options.add_options(f, FinetuneConfig)
    options.add_run(f)

    b = sub.add_parser("bench", help="pretraining throughput", formatter_class=options.HelpFormatter)
    options.add_options(b, BenchConfig, only=("model", "size", "batch", "width", "steps", "compile", "device",
                                              "precision"))
    return parser


def run_command(args: argparse.Namespace) -> None:
    if args.command == "pretrain":
        pretrain(options.from_args(PretrainConfig, args), args.out, resume=args.resume, overwrite=args.overwrite)
    elif args.command == "linear-eval":
        linear_eval(options.from_args(LinearEvalConfig, args), args.out, resume=args.resume, overwrite=args.overwrite)
    elif args.command == "knn":
        knn_eval(options.from_args(KnnConfig, args))
    elif args.command == "finetune":
        finetune(options.from_args(FinetuneConfig, args), args.out, resume=args.resume, overwrite=args.overwrite)
    elif args.command == "bench":
        rows = bench(options.from_args(BenchConfig, args))
        if rows[0]["device"] == "cpu":
            native = train.cpu_has_native_bf16()
            print(f"CPU: {'computes bf16 natively (AMX or AVX512-BF16)' if native else 'no native bf16 (emulated: slower than fp32)'}; "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print("| model | size | batch | device | compile | precision | network img/s | end-to-end img/s | ratio | "
              "augment img/s | peak GiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
            print(f"| {r['model']} (w{r['width']:g}) | {r['size']} | {r['batch']} | {r['device']} ({r['threads']} threads) | "
                  f"{r['compile']} | {r['precision']} | {r['network_img_s']:,.0f} | {r['end_to_end_img_s']:,.0f} | {r['ratio']:.2f} | "
                  f"{r['augment_img_s']:,.0f} | {mem} |")


def main(argv: list[str] | None = None) -> int:
    return train.main(argv, run=run_command, parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
