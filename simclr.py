"""SimCLR pretraining, evaluation and fine-tuning: stages 1 and 2 of the SimCLR v2 recipe.

    pretrain     task-agnostic contrastive pretraining (SimCLR v1 Alg. 1, v2 section 2.1)
    linear-eval  frozen encoder, features computed once, a linear classifier on top (v1 section 4)
    finetune     supervised fine-tuning from a middle layer of the projection head (v2 section 2.2)
    bench        throughput: network alone, augmentation alone, end to end

The engine these stages share with distill.py and transfer.py (devices, run folders, checkpoints,
LARS, the schedule, the training loop) lives in train.py.

Command line:  python simclr.py pretrain --data shapes-pool --out runs/pretrain
               python simclr.py linear-eval --checkpoint runs/pretrain/checkpoint.pt --data shapes5
               python simclr.py finetune --checkpoint runs/pretrain/checkpoint.pt --data shapes5 --fraction 0.1
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
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import data
import losses
import models
import train
from train import UserError


# ----------------------------------------------------------------------------------------------
# Stage 1: pretraining


@dataclass
class PretrainConfig:
    """Defaults follow the official CIFAR command up to 64 px and the ImageNet settings above
    (resolved by `resolve_defaults`; None means 'choose by image size')."""
    data: str = "shapes-pool"
    eval_data: str | None = "shapes5"  # labeled task for the kNN monitor (its train = bank, val = queries)
    eval_images: int | None = None     # an embedded eval_data's train size (val carved from it); None: default
    image_size: int = 32
    n_images: int | None = None        # size of a generated pool / cap on a folder
    model: str = "resnet18"
    width: float = 1.0
    cifar_stem: bool | None = None     # None: on up to 64 px
    head_layers: int = 2
    head_hidden: int | None = None     # None: the encoder's feature width
    out_dim: int = 128
    epochs: int = 100
    batch_size: int = 512
    optimizer: str = "lars"
    base_lr: float | None = None       # None: 1.0 (<= 64 px) or 0.3 (ImageNet), scaled by batch/256
    lr_scaling: str = "linear"
    weight_decay: float | None = None  # None: 1e-4 (<= 64 px) or 1e-6
    momentum: float = 0.9
    warmup_epochs: float | None = None  # None: 10, at most a tenth of the run
    temperature: float = 0.5
    strength: float | None = None      # None: 0.5 (<= 64 px) or 1.0
    crop_min_scale: float = 0.08       # smallest crop area (fraction of the image), SimCLR's 0.08
    blur: bool | None = None           # None: off up to 64 px
    knn_every: int = 10
    knn_k: int = 200
    log_every: int = 20
    checkpoint_every: int = 0
    compile: bool = False
    seed: int = 0
    data_seed: int | None = None       # seed that draws a generated or subsampled pool; None: `seed`
    device: str = "auto"
    root: str | None = None
    cache_dir: str | None = None
    skip_bad: bool = False             # leave unreadable images of a folder out (with a warning)


def resolve_defaults(cfg: PretrainConfig) -> PretrainConfig:
    small = cfg.image_size <= 64
    cfg = dataclasses.replace(cfg)
    if cfg.cifar_stem is None:
        cfg.cifar_stem = small
    if cfg.base_lr is None:
        cfg.base_lr = 1.0 if small else 0.3
    if cfg.weight_decay is None:
        cfg.weight_decay = 1e-4 if small else 1e-6
    if cfg.strength is None:
        cfg.strength = 0.5 if small else 1.0
    if cfg.blur is None:
        cfg.blur = not small
    if cfg.warmup_epochs is None:
        cfg.warmup_epochs = min(10.0, cfg.epochs / 10)
    return cfg


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


def pretrain(cfg: PretrainConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> dict:
    """SimCLR pretraining (v1 Algorithm 1 with v2's deeper head); returns a summary dict with the
    checkpoint path, the final loss and the kNN accuracy of the learned and of a random encoder."""
    cfg = resolve_defaults(cfg)
    train.check_positive(epochs=cfg.epochs, batch_size=cfg.batch_size, base_lr=cfg.base_lr, temperature=cfg.temperature,
                   width=cfg.width, image_size=cfg.image_size, crop_min_scale=cfg.crop_min_scale,
                   eval_images=cfg.eval_images)
    if cfg.crop_min_scale > 1:
        raise UserError(f"--crop-min-scale is a fraction of the image area in (0, 1]; got {cfg.crop_min_scale}.")
    device = train.select_device(cfg.device)
    distributed = train.init_distributed(device)
    run = train.RunFolder(out, resume=resume, overwrite=overwrite, is_main=distributed.is_main)
    train.seed_everything(cfg.seed)
    # A separate data seed lets runs with different training seeds share one pool (run_all.py's student bases).
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    pool = data.load_unlabeled(cfg.data, image_size=cfg.image_size, n=cfg.n_images, root=cfg.root,
                               seed=data_seed, cache_dir=cfg.cache_dir, skip_bad=cfg.skip_bad)
    global_batch = cfg.batch_size
    if global_batch % distributed.world_size:
        raise UserError(f"--batch-size {global_batch} must divide evenly among {distributed.world_size} processes.")
    if global_batch > len(pool):
        raise UserError(f"--batch-size {global_batch} is larger than the dataset '{cfg.data}' "
                        f"({len(pool)} images). Use a batch of at most {len(pool)}.")
    loader = data.BatchLoader(pool, global_batch // distributed.world_size, device, shuffle=True, drop_last=True,
                              seed=cfg.seed, rank=distributed.rank, world_size=distributed.world_size)
    arch = dict(encoder=cfg.model, width=cfg.width, cifar_stem=cfg.cifar_stem, head_layers=cfg.head_layers,
                head_hidden=cfg.head_hidden, out_dim=cfg.out_dim)
    model = train.build_simclr_model(arch).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if distributed.world_size > 1:
        if device.type == "cuda":
            # SimCLR's global BN: statistics over all ranks' views, so no rank can find the positive
            # from batch-local statistics (v1 section 2.3).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = torch.compile(model) if cfg.compile else model
    augmentation = augment.SimCLRAugment(cfg.image_size, crop=True, flip=True, color=True, blur=cfg.blur,
                                         strength=cfg.strength, scale=(cfg.crop_min_scale, 1.0))
    lr = train.scaled_lr(cfg.base_lr, global_batch, cfg.lr_scaling)
    schedule = train.Schedule(epochs=cfg.epochs, lr=lr, optimizer=cfg.optimizer, momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, log_every=cfg.log_every,
                        checkpoint_every=cfg.checkpoint_every, eval_every=cfg.knn_every)
    config = dict(stage="pretrain", **asdict(cfg), effective_lr=lr, world_size=distributed.world_size,
                  device_resolved=str(device), images=len(pool), steps_per_epoch=len(loader),
                  augmentation=augmentation.describe(), torch=torch.__version__)
    if not run.resuming:
        run.write_config(config)
    if distributed.is_main:
        print(f"pretrain: {cfg.model} (width {cfg.width}, {'CIFAR' if cfg.cifar_stem else 'ImageNet'} stem, "
              f"{cfg.head_layers}-layer head) on {len(pool)} images of {cfg.image_size}px, device {device}, "
              f"world {distributed.world_size}; {cfg.optimizer} lr {lr:.4g} (= {cfg.base_lr} x {global_batch}/256), "
              f"wd {cfg.weight_decay}, warm-up {cfg.warmup_epochs} epochs, T {cfg.temperature}, "
              f"augment {augmentation.describe()}, {cfg.epochs} epochs x {len(loader)} steps", file=sys.stderr)
    # A generated task can be as large as wanted: a 100-image val split measures kNN accuracy to about
    # +-5 points, too coarse to tell a short pretraining from a random encoder.
    eval_size = dict(n_train=cfg.eval_images) if cfg.eval_images and cfg.eval_data in data.EMBEDDED_TASKS else {}
    task = data.load_task(cfg.eval_data, image_size=cfg.image_size, root=cfg.root, seed=data_seed,
                          cache_dir=cfg.cache_dir, skip_bad=cfg.skip_bad,
                          **eval_size) if cfg.eval_data and distributed.is_main else None
    encoder = train.unwrap(model).encoder
    knn = lambda enc: knn_monitor(enc, task.train, task.val, device, cfg.knn_k, cfg.image_size)  # noqa: E731
    evaluate = (lambda: dict(knn_top1=knn(encoder))) if task else None
    loss_fn = contrastive_loss_fn(train_model, augmentation, cfg.temperature, distributed)
    meta = dict(kind="pretrain", arch=arch, config=json.dumps(config), image_size=cfg.image_size,
                mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    history = train.fit(train_model, loss_fn, loader, run, schedule, device=device, seed=cfg.seed, meta=meta,
                  evaluate=evaluate, distributed=distributed, desc="pretrain")
    summary = dict(checkpoint=str(run.checkpoint), history=history)
    if task is not None:
        summary["knn_top1"] = history[-1]["knn_top1"] if history else knn(encoder)
        torch.manual_seed(cfg.seed + 1)
        random_encoder = train.build_simclr_model(arch).encoder.to(device)
        summary["knn_top1_random_encoder"] = knn(random_encoder)
        print(f"kNN (k={cfg.knn_k}) top-1 on {cfg.eval_data} val: pretrained {summary['knn_top1']:.4f}, "
              f"random encoder {summary['knn_top1_random_encoder']:.4f}", file=sys.stderr)
        train.atomic_write_text(json.dumps({k: v for k, v in summary.items()}, indent=2) + "\n", run.path / "summary.json")
    return summary


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


def knn_monitor(encoder: nn.Module, bank_set: data.ImageSet, val: data.ImageSet, device: torch.device,
                k: int = 200, size: int | None = None) -> float:
    """kNN accuracy of `encoder`'s features: train images as the bank, val images as queries."""
    was_training = encoder.training
    encoder.eval()
    bank = train.extract_features(encoder, bank_set, device, size=size)
    query = train.extract_features(encoder, val, device, size=size)
    encoder.train(was_training)
    to = lambda a: torch.as_tensor(np.asarray(a), device=device, dtype=torch.long)
    return knn_accuracy(bank, to(bank_set.labels), query, to(val.labels), len(bank_set.classes), k=k)


# ----------------------------------------------------------------------------------------------
# Stage 2: linear evaluation and fine-tuning


def linear_eval(checkpoint: str | os.PathLike, task_name: str, out: str | os.PathLike | None = None, *,
                epochs: int = 100, lr: float = 0.1, batch_size: int = 256, head_layer: int = 0,
                seed: int = 0, device: str = "auto", root: str | None = None, cache_dir: str | None = None,
                skip_bad: bool = False, resume: bool = False, overwrite: bool = False) -> dict:
    """Linear evaluation (SimCLR v1 section 4): frozen encoder, features of the un-augmented train,
    val and test images computed once, a linear layer trained on them; top-1/top-5 on val and test."""
    train.check_positive(epochs=epochs, lr=lr, batch_size=batch_size)
    dev = train.select_device(device)
    run = train.RunFolder.redo(out, "linear-eval", resume, overwrite) if out is not None else None  # before any work
    train.seed_everything(seed)
    model, ckpt = train.load_pretrained(checkpoint)
    task = data.load_task(task_name, image_size=ckpt["image_size"], root=root, seed=seed, cache_dir=cache_dir,
                          skip_bad=skip_bad)
    classifier = models.Classifier(model.encoder, model.head, head_layer, task.num_classes, ckpt["mean"], ckpt["std"]).to(dev)
    classifier.eval()
    frozen = {k: v.clone() for k, v in classifier.encoder.state_dict().items()}
    feats = {name: train.extract_features(classifier.features, split, dev, size=ckpt["image_size"],
                                    desc=f"features {name}")
             for name, split in (("train", task.train), ("val", task.val), ("test", task.test))}
    label = lambda s: torch.as_tensor(np.asarray(s.labels), device=dev, dtype=torch.long)
    classifier.fc = train.train_linear(feats["train"], label(task.train), task.num_classes, epochs, batch_size, lr,
                                 seed=seed)
    train.check_frozen(frozen, classifier.encoder)
    result = dict(task=task.name, checkpoint=str(checkpoint), head_layer=head_layer,
                  val=train.accuracy_report(classifier.fc(feats["val"]), task.val.labels, task.classes),
                  test=train.accuracy_report(classifier.fc(feats["test"]), task.test.labels, task.classes))
    for split in ("val", "test"):
        result[split].pop("predictions")
    print(f"linear eval on {task.name}: val top-1 {result['val']['top1']:.4f}, test top-1 {result['test']['top1']:.4f}",
          file=sys.stderr)
    if run is not None:
        run.write_config(dict(stage="linear-eval", checkpoint=str(checkpoint), task=task_name, epochs=epochs,
                              lr=lr, batch_size=batch_size, head_layer=head_layer, seed=seed))
        arch = train.classifier_arch(ckpt["arch"], head_layer, task.num_classes, ckpt["mean"], ckpt["std"])
        run.save(dict(kind="linear-eval", format=train.CHECKPOINT_FORMAT, arch=arch, model=classifier.state_dict(),
                      classes=task.classes, image_size=ckpt["image_size"]), "best.pt")
        train.atomic_write_text(json.dumps(result, indent=2) + "\n", run.path / "results.json")
    return result


def finetune(checkpoint: str | os.PathLike | None, task_name: str, out: str | os.PathLike, *,
             fraction: float = 1.0, head_layer: int = 1, crop: bool = True, flip: bool = True,
             color: bool = False, blur: bool = False, strength: float = 0.5, epochs: int = 30,
             batch_size: int = 128, lr: float = 0.05, optimizer: str = "sgd", weight_decay: float = 0.0,
             momentum: float = 0.9, seed: int = 0, device: str = "auto", root: str | None = None,
             cache_dir: str | None = None, skip_bad: bool = False, arch: dict | None = None, image_size: int = 32,
             resume: bool = False, overwrite: bool = False, log_every: int = 20,
             task: data.TaskData | None = None) -> dict:
    """Supervised fine-tuning of the whole network (SimCLR v2 section 2.2) on `fraction` of the
    labels (class-balanced), from layer `head_layer` of the projection head (v2: 1 of a 3-layer head).

    `checkpoint=None` with `arch` trains the same network from random initialisation (the
    supervised baseline). Model selection: best val top-1 (best.pt); the test split is reported
    for that model only. Returns val/test reports and the best.pt path (a distillation teacher)."""
    train.check_positive(epochs=epochs, lr=lr, batch_size=batch_size, fraction=fraction)
    if fraction > 1:
        raise UserError(f"--fraction must be in (0, 1]; got {fraction}.")
    dev = train.select_device(device)
    train.seed_everything(seed)
    if checkpoint is not None:
        pretrained, ckpt = train.load_pretrained(checkpoint)
        arch, image_size, mean, std = ckpt["arch"], ckpt["image_size"], ckpt["mean"], ckpt["std"]
    else:
        if arch is None:
            raise ValueError("finetune from scratch needs `arch`")
        pretrained, mean, std = train.build_simclr_model(arch), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    task = task or data.load_task(task_name, image_size=image_size, root=root, seed=seed, cache_dir=cache_dir,
                                  skip_bad=skip_bad)
    if head_layer > arch["head_layers"]:
        raise UserError(f"--head-layer {head_layer} is deeper than the {arch['head_layers']}-layer projection head.")
    labeled = data.labeled_fraction(task.train, fraction, seed) if fraction < 1 else task.train
    if batch_size > len(labeled):
        raise UserError(f"--batch-size {batch_size} is larger than the {len(labeled)} labeled training images "
                        f"of '{task.name}' at fraction {fraction}. Use a batch of at most {len(labeled)}.")
    run = train.RunFolder(out, resume=resume, overwrite=overwrite)
    model = models.Classifier(pretrained.encoder, pretrained.head, head_layer, task.num_classes, mean, std).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    augmentation = augment.SimCLRAugment(image_size, crop=crop, flip=flip, color=color, blur=blur, strength=strength,
                                         scale=(0.08, 1.0))
    cls_arch = train.classifier_arch(arch, head_layer, task.num_classes, mean, std)
    config = dict(stage="finetune", checkpoint=str(checkpoint), task=task.name, fraction=fraction,
                  labeled_images=len(labeled), head_layer=head_layer, augmentation=augmentation.describe(),
                  epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                  momentum=momentum, seed=seed, device=str(dev))
    if not run.resuming:
        run.write_config(config)
    loader = data.BatchLoader(labeled, batch_size, dev, shuffle=True, drop_last=True, seed=seed)
    schedule = train.Schedule(epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
                        log_every=log_every)
    evaluate = lambda: dict(val_top1=train.evaluate_classifier(model, task.val, dev, size=image_size)["top1"])
    meta = dict(kind="finetune", arch=cls_arch, classes=task.classes, image_size=image_size, config=json.dumps(config))
    train.fit(model, train.supervised_loss_fn(model, augmentation), loader, run, schedule, device=dev, seed=seed, meta=meta,
        evaluate=evaluate, select="val_top1", desc=f"finetune {task.name}")
    best, _ = train.load_classifier(run.path / "best.pt", task.num_classes)
    best = best.to(dev)
    result = dict(task=task.name, fraction=fraction, head_layer=head_layer, augmentation=augmentation.describe(),
                  best=str(run.path / "best.pt"), val=train.evaluate_classifier(best, task.val, dev, size=image_size),
                  test=train.evaluate_classifier(best, task.test, dev, size=image_size))
    for split in ("val", "test"):
        result[split].pop("predictions")
    train.atomic_write_text(json.dumps(result, indent=2) + "\n", run.path / "results.json")
    print(f"finetune {task.name} ({fraction:.0%} labels, {augmentation.describe()}): val top-1 "
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


def bench(model_name: str = "resnet18", size: int = 32, batch_size: int = 512, width: float = 1.0,
          steps: int = 20, warmup: int = 5, device: str = "auto", compile: bool = False,
          blur: bool | None = None) -> dict:
    """Pretraining throughput in source images/s (each is two views): the network alone on batches
    already augmented, the augmentation alone, and the whole step from uint8 images on the device."""
    dev = train.select_device(device)
    torch.manual_seed(0)
    blur = size > 64 if blur is None else blur
    arch = dict(encoder=model_name, width=width, cifar_stem=size <= 64, head_layers=2, head_hidden=None, out_dim=128)
    model = train.build_simclr_model(arch).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile else model
    optimizer = train.make_optimizer(model, "lars", 0.1, 1e-6)
    augmentation = augment.SimCLRAugment(size, blur=blur, strength=0.5 if size <= 64 else 1.0)
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    loss_fn = contrastive_loss_fn(step_model, augmentation, 0.5, train.Distributed())
    fixed_views = torch.cat([augmentation(images, g), augmentation(images, g)])

    def network_step():
        with train.autocast(dev):
            _, z = step_model(fixed_views)
            loss = losses.nt_xent(*z.float().chunk(2), 0.5, check_finite=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def full_step():
        with train.autocast(dev):
            loss = loss_fn(images, None, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def augment_only():
        augmentation(images, g), augmentation(images, g)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_net = _timed(network_step, dev, steps, warmup)
    t_aug = _timed(augment_only, dev, steps, warmup)
    t_full = _timed(full_step, dev, steps, warmup)
    n = steps * batch_size
    result = dict(model=model_name, size=size, batch=batch_size, width=width, device=str(dev), compile=compile,
                  threads=torch.get_num_threads(), network_img_s=n / t_net, end_to_end_img_s=n / t_full,
                  augment_img_s=n / t_aug, ratio=t_net / t_full,
                  peak_memory_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None)
    return result


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=train.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = PretrainConfig()
    p = sub.add_parser("pretrain", help="SimCLR contrastive pretraining",
                       formatter_class=train.HelpFormatter)
    p.add_argument("--data", default=d.data, help="unlabeled images: shapes-pool, a folder, or a dataset name")
    p.add_argument("--eval-data", default=d.eval_data, help="labeled task for the kNN monitor ('' for none)")
    p.add_argument("--eval-images", type=int, default=d.eval_images,
                   help="train images of an embedded --eval-data (10%% become its val queries); None: its default")
    p.add_argument("--image-size", type=int, default=d.image_size, help="working resolution in pixels")
    p.add_argument("--n-images", type=int, default=d.n_images, help="pool size (generated) or cap (folder)")
    p.add_argument("--model", default=d.model, choices=models.MODEL_NAMES, help="encoder (models.py)")
    p.add_argument("--width", type=float, default=d.width, help="channel multiplier (SimCLR 2x, 4x; 0.25 for CPU)")
    p.add_argument("--cifar-stem", type=train.bool_arg, default=None, help="3x3 stem, no max-pool (default: on up to 64 px)")
    p.add_argument("--head-layers", type=int, default=d.head_layers, help="2 (SimCLR v1) or 3 (v2)")
    p.add_argument("--head-hidden", type=int, default=None, help="head width (default: the encoder's feature width)")
    p.add_argument("--out-dim", type=int, default=d.out_dim, help="projection size z (the loss's input)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the unlabeled images")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (all processes)")
    p.add_argument("--optimizer", default=d.optimizer, choices=["lars", "sgd"],
                   help="train.LARS (SimCLR) or SGD with momentum")
    p.add_argument("--base-lr", type=float, default=None, help="scaled by batch/256 (default: 1.0 up to 64 px, else 0.3)")
    p.add_argument("--lr-scaling", default=d.lr_scaling, choices=["linear", "sqrt"],
                   help="lr = base-lr x batch/256 (linear) or base-lr x sqrt(batch) (sqrt; SimCLR v2 uses 0.075)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 1e-4 up to 64 px, else 1e-6")
    p.add_argument("--momentum", type=float, default=d.momentum, help="momentum of train.LARS / SGD")
    p.add_argument("--warmup-epochs", type=float, default=None, help="default: 10, at most a tenth of the run")
    p.add_argument("--temperature", type=float, default=d.temperature, help="NT-Xent temperature")
    p.add_argument("--strength", type=float, default=None, help="colour distortion strength (default: 0.5 up to 64 px, else 1.0)")
    p.add_argument("--crop-min-scale", type=float, default=d.crop_min_scale,
                   help="smallest random-crop area as a fraction of the image (SimCLR: 0.08)")
    p.add_argument("--blur", type=train.bool_arg, default=None, help="Gaussian blur (default: off up to 64 px)")
    p.add_argument("--knn-every", type=int, default=d.knn_every, help="epochs between kNN monitor evaluations")
    p.add_argument("--knn-k", type=int, default=d.knn_k, help="neighbours of the kNN monitor")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines (host syncs)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints (0: each epoch)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_common(p)
    train.add_run(p)

    e = sub.add_parser("linear-eval", help="linear classifier on frozen features",
                       formatter_class=train.HelpFormatter)
    e.add_argument("--checkpoint", required=True, help="a pretraining checkpoint.pt")
    e.add_argument("--data", default="shapes5", help="labeled task: an embedded name, a dataset name or a folder")
    e.add_argument("--epochs", type=int, default=100, help="epochs of the linear layer on cached features")
    e.add_argument("--lr", type=float, default=0.1, help="learning rate (SGD, momentum 0.9, cosine)")
    e.add_argument("--batch-size", type=int, default=256, help="batch of cached features")
    e.add_argument("--head-layer", type=int, default=0, help="0: encoder output; k: after head layer k")
    train.add_common(e)
    train.add_run(e, required=False)

    f = sub.add_parser("finetune", help="supervised fine-tuning from a head layer",
                       formatter_class=train.HelpFormatter)
    f.add_argument("--checkpoint", required=True, help="a pretraining checkpoint.pt")
    f.add_argument("--data", default="shapes5", help="labeled task: an embedded name, a dataset name or a folder")
    f.add_argument("--fraction", type=float, default=1.0, help="fraction of training labels (0.01, 0.1, 1)")
    f.add_argument("--head-layer", type=int, default=1, help="fine-tune from this head layer (SimCLR v2: 1)")
    for name, default in (("crop", True), ("flip", True), ("color", False), ("blur", False)):
        f.add_argument(f"--{name}", type=train.bool_arg, default=default, help=f"use {name} augmentation while fine-tuning")
    f.add_argument("--strength", type=float, default=0.5, help="colour distortion strength when --color is on")
    f.add_argument("--epochs", type=int, default=30, help="passes over the labeled subset")
    f.add_argument("--batch-size", type=int, default=128, help="labeled images per step")
    f.add_argument("--lr", type=float, default=0.05, help="peak learning rate (warm-up, then cosine)")
    f.add_argument("--optimizer", default="sgd", choices=["lars", "sgd"], help="optimiser")
    f.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (not on biases and BN)")
    train.add_common(f)
    train.add_run(f)

    b = sub.add_parser("bench", help="pretraining throughput", formatter_class=train.HelpFormatter)
    b.add_argument("--model", default="resnet18", choices=models.MODEL_NAMES, help="encoder")
    b.add_argument("--size", type=int, default=32, help="image size in pixels")
    b.add_argument("--batch", type=int, default=512, help="source images per step (two views each)")
    b.add_argument("--width", type=float, default=1.0, help="channel multiplier")
    b.add_argument("--steps", type=int, default=20, help="timed steps (after 5 warm-up steps)")
    b.add_argument("--compile", choices=["off", "on", "both"], default="off", help="torch.compile the model")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return parser


def run_command(args: argparse.Namespace) -> None:
    if args.command == "pretrain":
        fields = {f for f in PretrainConfig.__dataclass_fields__}
        cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
        cfg.eval_data = cfg.eval_data or None
        pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    elif args.command == "linear-eval":
        linear_eval(args.checkpoint, args.data, args.out, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                    head_layer=args.head_layer, seed=args.seed, device=args.device, root=args.root,
                    cache_dir=args.cache_dir, skip_bad=args.skip_bad, resume=args.resume, overwrite=args.overwrite)
    elif args.command == "finetune":
        finetune(args.checkpoint, args.data, args.out, fraction=args.fraction, head_layer=args.head_layer,
                 crop=args.crop, flip=args.flip, color=args.color, blur=args.blur, strength=args.strength,
                 epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                 weight_decay=args.weight_decay, seed=args.seed, device=args.device, root=args.root,
                 cache_dir=args.cache_dir, skip_bad=args.skip_bad, resume=args.resume, overwrite=args.overwrite)
    elif args.command == "bench":
        modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        rows = [bench(args.model, args.size, args.batch, args.width, args.steps, device=args.device, compile=c)
                for c in modes]
        print("| model | size | batch | device | compile | network img/s | end-to-end img/s | ratio | augment img/s | peak GiB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
            print(f"| {r['model']} (w{r['width']:g}) | {r['size']} | {r['batch']} | {r['device']} ({r['threads']} threads) | "
                  f"{r['compile']} | {r['network_img_s']:,.0f} | {r['end_to_end_img_s']:,.0f} | {r['ratio']:.2f} | "
                  f"{r['augment_img_s']:,.0f} | {mem} |")


def main(argv: list[str] | None = None) -> int:
    return train.main(argv, run=run_command, parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
