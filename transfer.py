"""Transfer learning: a pretrained encoder on a new labeled dataset, plus extract and export.

SimCLR v1 section 6 (appendix B.8) evaluates transfer in two ways, a linear classifier on frozen
features and fine-tuning of the whole network; the seed paper's Study 3 (their Table 4) trains new
linear layers on a frozen SimCLR ResNet-50 with random crop + flip, lr 0.1, no weight decay, batch
32 or 64, a short schedule. Three modes:

    linear-cached  frozen encoder, features of the un-augmented images computed once, a linear layer
                   trained on them (train.train_linear; the fastest; v1's linear transfer uses no
                   augmentation)
    linear-aug     frozen encoder (weights and batch-norm statistics), features recomputed every epoch
                   on a new augmented view of each image, only the linear layer learns (the seed
                   paper's Study 3)
    finetune       every weight trained (v1's fine-tuning protocol)

checkpoints.Encoder sources:
    * a checkpoint of this project: a SimCLR pretraining checkpoint (optionally features from a
      projection-head layer), or any classifier checkpoint (its encoder is reused);
    * a torchvision-layout ResNet/VGG state dict (torchvision's ImageNet weights, official SimCLR v1
      weights converted to that layout, or a file written by `export`), with --arch (+ --width).
      It is loaded strictly except for the classifier keys (fc.*, classifier.*); any other missing or
      unexpected key or shape mismatch is reported and refused.

Normalisation belongs to the source, never to a hidden constant: SimCLR models see raw [0, 1]
inputs (mean 0, std 1, stored in their checkpoints); torchvision's supervised ImageNet weights
expect ImageNet mean/std, so a torchvision-layout file defaults to --normalize imagenet unless
its `export` side-car (<file>.json) says otherwise; converted official SimCLR weights need
--normalize none. Every checkpoint written here stores mean/std.

Command line:  python transfer.py train --source runs/pretrain/checkpoint.pt --data shapes47 --out runs/t
               python transfer.py train --source resnet50-imagenet.pth --arch resnet50 --data dtd --mode finetune ...
               python transfer.py extract --source runs/t/best.pt --images photos/ --out feats --what predictions
               python transfer.py export --source runs/pretrain/checkpoint.pt --out encoder.pt
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import checkpoints
import data
import models
import options
import sources
import train
from options import UserError, option

MODES = ("linear-cached", "linear-aug", "finetune")

# Every setting a preset fixes; arguments left as None take the preset's value. `lr_scaling`
# "linear" means lr = base_lr * batch / 256 (SimCLR's rule); an explicit --lr is used as given.
PRESETS: dict[str, dict] = {
    # SimCLR v1's transfer protocol (appendix B.8, after Kornblith et al. 2019): a linear classifier
    # on frozen features of un-augmented images, or fine-tuning with SGD + Nesterov momentum 0.9 at
    # batch 256 with random crop + flip only. v1 picks lr and weight decay per dataset on validation
    # from grids (lr 1e-4..0.1, several weight decays or none); without a search we take the largest
    # grid lr, 0.1 at batch 256 (scaled linearly with the batch), and no weight decay, and a cosine
    # decay over 100 epochs (v1 fine-tunes 20,000 steps, about 100 epochs of a 50k-image set).
    "simclr": dict(mode="linear-cached", epochs=100, batch_size=256, base_lr=0.1, lr_scaling="linear",
                   momentum=0.9, weight_decay=0.0, crop=True, flip=True, color=False),
    # The seed paper's Study 3: new linear layer on the frozen model, random crop + flip, lr 0.1,
    # no weight decay, batch 64 (their Figure 6 also uses 32), 30 passes ("30 iterations" in their
    # text, read as epochs). Momentum is not stated; 0.9 as everywhere else here.
    "paper": dict(mode="linear-aug", epochs=30, batch_size=64, base_lr=0.1, lr_scaling="none",
                  momentum=0.9, weight_decay=0.0, crop=True, flip=True, color=False),
}


@dataclass
class TransferConfig(train.PresetViewOptions, train.MatchedViewOptions, train.PresetTrainingOptions,
                     train.LoopOptions, options.StageConfig):
    """Every setting of a transfer run; settings left as None take PRESETS[preset]'s value. The
    source options (source, arch, width, cifar_stem, normalize) are shared with extract and export."""
    source: str = option(None, "a checkpoint of this project, or a torchvision-layout ResNet/VGG state dict (.pt/.pth)",
                         required=True, flags=["--source", "--encoder-weights"])
    arch: str | None = option(None, "network of a torchvision-layout file; None: its export side-car",
                              choices=models.MODEL_NAMES)
    width: float | None = option(None, "channel multiplier of a torchvision-layout file (1)", allowed=options.POSITIVE)
    cifar_stem: bool | None = option(None, "3x3 stem in a torchvision-layout file; None: off, as torchvision")
    normalize: str | None = option(None, "input normalisation of a torchvision-layout file; None: imagenet "
                                   "(converted SimCLR weights need none); project checkpoints carry their own",
                                   choices=list(checkpoints.NORMALIZATIONS))
    data: str = option("shapes47", "labeled task: an embedded name, a dataset name or a folder")
    preset: str = option("simclr", "simclr: SimCLR v1's transfer protocol; paper: the seed paper's Study 3",
                         choices=list(PRESETS))
    mode: str | None = option(None, "None: the preset's (simclr: linear-cached, paper: linear-aug)", choices=MODES)
    head_layer: int | None = option(None, "features after this projection-head layer (0: encoder)",
                                    allowed=options.NON_NEGATIVE)
    image_size: int | None = option(None, "working size; None: the source's", allowed=options.POSITIVE)
    lr: float | None = option(None, "peak lr, used as given; None: preset's, scaled by batch", allowed=options.POSITIVE)


SOURCE_OPTIONS = ("source", "arch", "width", "cifar_stem", "normalize")


# ----------------------------------------------------------------------------------------------
# Augmented views through a frozen encoder


class AugmentedFeatures:
    """train.fit's loader for linear-aug: batches of (frozen-base features (B, D), labels (B,)).

    A frozen encoder in eval mode maps a view to the same features whatever batch it is in, so
    each epoch draws one augmented view of every training image (from (seed, epoch) alone) and runs
    them through the base once, in large batches without gradients; the epoch's steps then train
    the layers on top on those features, in the order data.BatchLoader gives for (seed, epoch).
    Resuming mid-epoch recomputes the same views. Since the views do not depend on the batch size,
    runs that differ only in it may pass one `shared` dict ((views, epoch) -> features) and compute
    each epoch once; it keeps at most `shared_bytes` of them and drops those of other views (another
    seed or augmentation) (run_all's Study 3 uses this).
    `compile`: torch.compile the base's forward (train.compiled), about 2x on a CPU."""
    CHUNK = 256  # views per forward pass of the base

    def __init__(self, model: models.Classifier, images: data.ImageSet, view: Callable, batch_size: int,
                 rt: train.Runtime, seed: int, varies: bool, shared: dict | None = None,
                 shared_bytes: int = 2**30, compile: bool = False):
        self.model, self.images, self.view, self.batch_size = model, images, view, batch_size
        self.base = train.compiled(model.base, compile)
        self.rt, self.seed, self.varies = rt, seed, varies
        self.order = data.BatchLoader(images, batch_size, rt.device, shuffle=True, drop_last=True, seed=seed)
        self.labels = torch.as_tensor(np.asarray(images.labels), dtype=torch.long, device=rt.device)
        self.shared = {} if shared is None else shared
        self.shared_bytes = shared_bytes
        # Features shared by a run with other views (another seed or augmentation) are not these.
        self.views_of = (seed, getattr(view, "describe", lambda: "none")(), len(images))
        for other in [k for k in self.shared if k[0] != self.views_of]:
            del self.shared[other]

    def __len__(self) -> int:
        return len(self.order)

    @torch.no_grad()
    def features(self, epoch: int) -> torch.Tensor:
        """(N, D) float32: the base's features of epoch `epoch`'s view of every image, in image order."""
        view_epoch = epoch if self.varies else 0  # without augmentation every epoch sees the same images
        key = (self.views_of, view_epoch)
        if key not in self.shared:
            g = torch.Generator(device=self.rt.device).manual_seed(self.seed * 1_000_003 + view_epoch)
            out = []
            with self.rt.autocast():
                for x, _ in self.images.batches(self.CHUNK, self.rt.device).epoch(0):
                    views = self.view(x, g)
                    # A short last chunk is padded, so that a compiled base sees one batch shape.
                    padded = F.pad(views, (0, 0, 0, 0, 0, 0, 0, self.CHUNK - len(views)))
                    out.append(self.base(padded)[:len(views)].float())
            out = torch.cat(out)
            if sum(f.nbytes for f in self.shared.values()) + out.nbytes > self.shared_bytes:
                return out
            self.shared[key] = out
        return self.shared[key]

    def epoch(self, e: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        features = self.features(e)
        order = torch.from_numpy(self.order.indices(e)).to(self.rt.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield features[idx], self.labels[idx]


# ----------------------------------------------------------------------------------------------
# Transfer


def resolve_settings(cfg: TransferConfig) -> TransferConfig:
    """A copy of cfg with every setting left as None taken from its preset (the learning rate
    scaled by batch / 256 where the preset says so), after checking the options."""
    options.validate(cfg)
    p = PRESETS[cfg.preset]
    mode = cfg.mode or p["mode"]
    if mode == "linear-cached" and any(v for v in (cfg.crop, cfg.flip, cfg.color)):
        raise UserError("--mode linear-cached computes features once on un-augmented images; augmentation needs "
                        "--mode linear-aug or finetune.")
    given = {k: getattr(cfg, k) for k in ("epochs", "batch_size", "momentum", "weight_decay", "crop", "flip", "color")}
    cfg = dataclasses.replace(cfg, mode=mode, **{k: p[k] if v is None else v for k, v in given.items()})
    if cfg.lr is None:
        scaled = p["lr_scaling"] == "linear"
        cfg = dataclasses.replace(cfg, lr=p["base_lr"] * cfg.batch_size / 256 if scaled else p["base_lr"])
    train.check_positive(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr)
    if cfg.mode == "finetune":
        train.check_batch_for_batch_norm(cfg.batch_size)
    return cfg


def load_source(cfg: TransferConfig, task: data.TaskData | None) -> tuple[checkpoints.Encoder, int, data.TaskData]:
    """(the encoder of cfg.source, the working image size, the task at that size), checking that the
    encoder takes images of that size and that one batch fits in the training split."""
    enc = checkpoints.load_encoder(cfg.source, arch=cfg.arch, width=cfg.width, cifar_stem=cfg.cifar_stem,
                                   normalize=cfg.normalize, head_layer=cfg.head_layer)
    image_size = cfg.image_size or enc.image_size
    train.check_input_size(enc.arch["encoder"], image_size)
    task = task or data.load_task(cfg.data, image_size=image_size, root=cfg.root, seed=cfg.seed,
                                  cache_dir=cfg.cache_dir, skip_bad=cfg.skip_bad)
    if cfg.batch_size > len(task.train):
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(task.train)} training images of "
                        f"'{task.name}'. Use a batch of at most {len(task.train)}.")
    return enc, image_size, task


def freeze_and_snapshot(model: models.Classifier) -> tuple[dict, nn.Module]:
    """Freeze the classifier's base (encoder and head); returns (a copy of its state, the frozen
    parts) for train.check_frozen after training."""
    model.freeze_base()
    parts = nn.ModuleDict({"encoder": model.encoder, **({"head": model.head} if model.head is not None else {})})
    return {k: v.clone() for k, v in parts.state_dict().items()}, parts


def transfer_views(cfg: TransferConfig, enc: checkpoints.Encoder, image_size: int) -> augment.SimCLRAugment | None:
    """The training views, None in linear-cached mode or with crop, flip and colour all off: the crop
    floor and colour strength the encoder was pretrained with, unless cfg gives them."""
    if cfg.mode == "linear-cached" or not (cfg.crop or cfg.flip or cfg.color):
        return None
    return train.matched_views(enc.pretrain_augmentation, image_size, crop=cfg.crop, flip=cfg.flip, color=cfg.color,
                               crop_min_scale=cfg.crop_min_scale, strength=cfg.strength, source=cfg.source,
                               stage="transfer")


def announce(config: dict, task: data.TaskData) -> None:
    """The run's settings in one line on stderr, as config.json records them."""
    c, arch = config, config["arch_resolved"]
    print(f"transfer: {arch['encoder']} (width {arch['width']}, {c['source_kind']} '{c['source']}', mean {c['mean']}, "
          f"std {c['std']}) -> {c['task']} ({task.num_classes} classes, {len(task.train)} train images at "
          f"{c['image_size_resolved']}px), {c['mode']}, augment {c['augmentation']}, lr {c['lr']:.4g}, "
          f"wd {c['weight_decay']}, batch {c['batch_size']}, {c['epochs']} epochs, device {c['device_resolved']}, "
          f"{c['precision_resolved']}", file=sys.stderr)


def frozen_split_features(model: models.Classifier, task: data.TaskData, rt: train.Runtime, image_size: int,
                          cache: dict | None = None) -> dict[str, torch.Tensor]:
    """{val, test}: the frozen base's features of the un-augmented val and test images, computed once.
    Runs on the same encoder and task (run_all's seeds and batch sizes) may share `cache`: the base
    never changes, so neither do these."""
    cache = {} if cache is None else cache
    for name, split in (("val", task.val), ("test", task.test)):
        if name not in cache:
            cache[name] = train.extract_features(model.base, split, rt, size=image_size)
    return cache


def transfer_objective(cfg: TransferConfig, model: models.Classifier, task: data.TaskData,
                       augmentation: augment.SimCLRAugment | None, rt: train.Runtime, image_size: int,
                       shared_features: dict | None, val_features: torch.Tensor | None
                       ) -> tuple[AugmentedFeatures | data.BatchLoader, Callable, Callable[[], dict]]:
    """(loader, loss_fn, evaluate) for train.fit: linear-aug trains the linear layer on the frozen
    base's features of augmented views (AugmentedFeatures) and selects on its `val_features`,
    finetune the whole network on the views."""
    view = augmentation if augmentation is not None else (lambda x, g: train.to_float(x, image_size))
    if cfg.mode == "linear-aug":
        loader = AugmentedFeatures(model, task.train, view, cfg.batch_size, rt, cfg.seed,
                                   varies=augmentation is not None, shared=shared_features,
                                   compile=train.resolve_compile(cfg.compile, rt.device, cfg.epochs * len(task.train)))
        loss_fn = lambda h, y, g: F.cross_entropy(model.classify(h).float(), y)  # noqa: E731
        return loader, loss_fn, train.val_top1(model, task.val, rt, image_size, val_features)
    loader = data.BatchLoader(task.train, cfg.batch_size, rt.device, shuffle=True, drop_last=True, seed=cfg.seed)
    step_model = train.compiled(model, train.resolve_compile(cfg.compile, rt.device,
                                                             cfg.epochs * len(loader) * cfg.batch_size))
    return loader, train.supervised_loss_fn(step_model, view), train.val_top1(model, task.val, rt, image_size)


def transfer(cfg: TransferConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
             task: data.TaskData | None = None, shared_features: dict | None = None,
             split_features: dict | None = None) -> dict:
    """Train a new linear layer (or fine-tune everything) on `cfg.data` from the encoder in `source`.
    shared_features: linear-aug's augmented features, shared by runs differing only in batch size
    (AugmentedFeatures); split_features: linear-aug's val and test features, shared by runs on the
    same encoder and task (frozen_split_features).

    Settings left as None come from PRESETS[preset]. Returns dict(val=..., test=... reports with top1,
    top5 (more than 5 classes) and per_class, best=<best.pt>, ...); best.pt is a classifier checkpoint
    (checkpoints.load_classifier) chosen by val top-1 in the trained modes (linear-cached keeps the last)."""
    cfg = resolve_settings(cfg)
    rt = train.runtime(cfg.device, cfg.precision)
    train.seed_everything(cfg.seed)
    enc, image_size, task = load_source(cfg, task)
    model, cls_arch = checkpoints.classifier_for(enc, task.num_classes)
    model = model.to(rt.device)
    snapshot = freeze_and_snapshot(model) if cfg.mode != "finetune" else None
    run = (checkpoints.RunFolder.redo(out, "transfer", resume, overwrite) if cfg.mode == "linear-cached"
           else checkpoints.RunFolder(out, resume=resume, overwrite=overwrite))
    augmentation = transfer_views(cfg, enc, image_size)
    config = dict(stage="transfer", **dataclasses.asdict(cfg), source_kind=enc.kind, arch_resolved=enc.arch,
                  head_layer_resolved=enc.head_layer, mean=enc.mean, std=enc.std, task=task.name,
                  augmentation=augmentation.describe() if augmentation else "none",
                  pretrain_augmentation=enc.pretrain_augmentation, image_size_resolved=image_size,
                  device_resolved=str(rt.device), precision_resolved=rt.precision)
    run.start(config)
    announce(config, task)
    meta = dict(kind="transfer", arch=cls_arch, classes=task.classes, image_size=image_size,
                config=json.dumps(config, default=str), **checkpoints.carried(enc.pretrain_augmentation))

    if cfg.mode == "linear-cached":
        reports = train.linear_probe(model, task, rt, image_size, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                     lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, seed=cfg.seed)
        run.save(dict(meta, format=checkpoints.CHECKPOINT_FORMAT, model=model.state_dict()), "best.pt")
    else:
        split_features = (frozen_split_features(model, task, rt, image_size, split_features)
                          if cfg.mode == "linear-aug" else None)
        loader, loss_fn, evaluate = transfer_objective(cfg, model, task, augmentation, rt, image_size, shared_features,
                                                       split_features["val"] if split_features else None)
        schedule = train.Schedule(epochs=cfg.epochs, lr=cfg.lr, optimizer="sgd", momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay, log_every=cfg.log_every)
        train.fit(model, loss_fn, loader, run, schedule, rt, seed=cfg.seed, meta=meta, evaluate=evaluate,
                  select="val_top1", desc=f"transfer {cfg.mode} {task.name}")
        reports = train.best_reports(run, task, rt, image_size, split_features)
    if snapshot is not None:
        train.check_frozen(*snapshot)
    return report(run, cfg, task, config["augmentation"], reports)


def report(run: checkpoints.RunFolder, cfg: TransferConfig, task: data.TaskData, augmentation: str,
           reports: dict) -> dict:
    """The val and test reports written to results.json, and the closing line on stderr: top-1,
    top-5 and the three weakest classes on test."""
    result = dict(task=task.name, mode=cfg.mode, preset=cfg.preset, source=str(cfg.source), classes=task.num_classes,
                  augmentation=augmentation, best=str(run.path / "best.pt"), **reports)
    checkpoints.atomic_write_text(json.dumps(result, indent=2) + "\n", run.path / "results.json")
    test = reports["test"]
    top5 = f", top-5 {test['top5']:.4f}" if "top5" in test else ""
    worst = sorted(test["per_class"].items(), key=lambda kv: kv[1])[:3]
    print(f"transfer {task.name} ({cfg.mode}): val top-1 {reports['val']['top1']:.4f}, test top-1 {test['top1']:.4f}{top5}; "
          f"weakest classes: " + ", ".join(f"{k} {v:.2f}" for k, v in worst) + f"; best: {result['best']}",
          file=sys.stderr)
    return result


# ----------------------------------------------------------------------------------------------
# Utilities: extract features or predictions for a folder, export an encoder


def refuse_existing(files: Iterable[Path], overwrite: bool) -> None:
    """Refuse to replace an output file unless `overwrite`."""
    for f in files:
        if f.exists() and not overwrite:
            raise UserError(f"'{f}' exists already. Pass --overwrite to replace it, or choose another --out.")


def network_for(enc: checkpoints.Encoder, what: str, dev: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """What extract runs on the images, in eval mode on `dev`: a classifier's logits or features,
    or the encoder's features (after its head layers where enc has some)."""
    if enc.classifier is not None:
        net = enc.classifier.to(dev).eval()
        return net if what == "predictions" else net.features
    net, _ = checkpoints.classifier_for(enc, 1)  # the fc is never used: features only
    return net.to(dev).eval().base


def extract(source: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
            what: str = "features", arch: str | None = None, width: float | None = None,
            cifar_stem: bool | None = None, normalize: str | None = None, head_layer: int | None = None,
            image_size: int | None = None, batch_size: int = 256, device: str = "auto",
            cache_dir: str | None = None, skip_bad: bool = False, overwrite: bool = False) -> dict:
    """Features (B, D) or predictions (logits (B, C)) for every image under the folder `images`
    (recursive; each image's centred square resized to the working size), saved as <out>.npy (float32,
    one row per file) with <out>.json: the files in row order (relative to the folder) and, for
    predictions, the classes and each file's predicted class. Predictions need a classifier checkpoint."""
    if what not in ("features", "predictions"):
        raise UserError(f"Unknown --what '{what}'. Use features or predictions.")
    train.check_positive(batch_size=batch_size, image_size=image_size)
    out = Path(out)
    npy, index = out.with_name(out.name + ".npy"), out.with_name(out.name + ".json")
    refuse_existing((npy, index), overwrite)
    enc = checkpoints.load_encoder(source, arch=arch, width=width, cifar_stem=cifar_stem, normalize=normalize,
                                   head_layer=head_layer)
    if what == "predictions" and enc.classifier is None:
        raise UserError(f"--what predictions needs a classifier checkpoint (best.pt of a finetune, distill or "
                        f"transfer run); '{source}' is a {enc.kind} encoder. Use --what features.")
    rt = train.runtime(device)
    image_size = image_size or enc.image_size
    train.check_input_size(enc.arch["encoder"], image_size)
    pixels, files = sources.load_folder_images(images, image_size, cache_dir=cache_dir, skip_bad=skip_bad)
    folder = data.ImageSet(pixels, None, [])
    values = train.extract_features(network_for(enc, what, rt.device), folder, rt, batch_size, size=image_size,
                                    desc="extract").cpu().numpy()
    record = dict(source=str(source), images=str(images), what=what, shape=list(values.shape), image_size=image_size,
                  mean=enc.mean, std=enc.std, files=list(files))
    if what == "predictions":
        record["classes"] = list(enc.classes or [])
        record["predicted"] = [record["classes"][i] if record["classes"] else int(i) for i in values.argmax(1)]
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_write(npy, lambda f: np.save(f, values.astype(np.float32)))
    checkpoints.atomic_write_text(json.dumps(record, indent=1) + "\n", index)
    print(f"extract: {what} {values.shape} of {len(files)} images under '{images}' -> {npy}, {index}", file=sys.stderr)
    return dict(npy=str(npy), index=str(index), shape=list(values.shape))


def export(source: str | os.PathLike, out: str | os.PathLike, *, arch: str | None = None, width: float | None = None,
           cifar_stem: bool | None = None, normalize: str | None = None, overwrite: bool = False) -> dict:
    """Write the encoder of `source` as a plain torchvision-layout state dict (names -> tensors, no
    classifier) to `out`, and its description (arch, width, cifar_stem, mean, std, image_size) to
    <out>.json, which checkpoints.load_encoder reads back. torchvision's resnetXX() / vggXX() of the same width
    loads the file with strict=False, reporting only the classifier (fc.* / classifier.*) as missing;
    an encoder with the CIFAR stem (3x3 conv1) needs that conv1 swapped in first. Projection-head
    layers are not part of the export."""
    out = Path(out)
    side = Path(str(out) + ".json")
    refuse_existing((out, side), overwrite)
    enc = checkpoints.load_encoder(source, arch=arch, width=width, cifar_stem=cifar_stem, normalize=normalize)
    state = {k: v.detach().cpu().clone() for k, v in enc.encoder.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_save(state, out)
    description = dict(format="torchvision-state-dict", arch=enc.arch["encoder"], width=enc.arch["width"],
                       cifar_stem=enc.arch["cifar_stem"], mean=enc.mean, std=enc.std, image_size=enc.image_size,
                       source=str(source), **checkpoints.carried(enc.pretrain_augmentation))
    checkpoints.atomic_write_text(json.dumps(description, indent=2) + "\n", side)
    print(f"export: {len(state)} tensors of {description['arch']} (width {description['width']}) -> {out} "
          f"(+ {side.name}: normalisation mean {enc.mean} std {enc.std})", file=sys.stderr)
    return dict(path=str(out), description=str(side), keys=len(state))


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=options.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="transfer to a labeled dataset", formatter_class=options.HelpFormatter,
                       epilog="presets: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    options.add_options(t, TransferConfig)
    options.add_run(t)

    e = sub.add_parser("extract", help="features or predictions for a folder of images",
                       formatter_class=options.HelpFormatter)
    options.add_options(e, TransferConfig, only=(*SOURCE_OPTIONS, "head_layer", "image_size", "device", "cache_dir",
                                                "skip_bad"))
    e.add_argument("--images", required=True, help="folder of images (searched recursively)")
    e.add_argument("--out", required=True, help="output prefix: writes <out>.npy and <out>.json")
    e.add_argument("--what", default="features", choices=["features", "predictions"],
                   help="encoder features, or class predictions of a classifier checkpoint")
    e.add_argument("--batch-size", type=options.bounded(int, options.POSITIVE, "batch-size"), default=256,
                   help="images per forward pass")

    x = sub.add_parser("export", help="an encoder as a plain torchvision-layout state dict",
                       formatter_class=options.HelpFormatter)
    options.add_options(x, TransferConfig, only=SOURCE_OPTIONS)
    x.add_argument("--out", required=True, help="the .pt file to write (plus <out>.json with its normalisation)")
    for command in (e, x):
        command.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def run_command(args: argparse.Namespace) -> None:
    source = dict(arch=args.arch, width=args.width, cifar_stem=args.cifar_stem, normalize=args.normalize)
    if args.command == "train":
        transfer(options.from_args(TransferConfig, args), args.out, resume=args.resume, overwrite=args.overwrite)
    elif args.command == "extract":
        extract(args.source, args.images, args.out, what=args.what, head_layer=args.head_layer,
                image_size=args.image_size, batch_size=args.batch_size, device=args.device,
                cache_dir=args.cache_dir, skip_bad=args.skip_bad, overwrite=args.overwrite, **source)
    elif args.command == "export":
        export(args.source, args.out, overwrite=args.overwrite, **source)


def main(argv: list[str] | None = None) -> int:
    return options.main(argv, run=run_command, parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
