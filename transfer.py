"""Transfer learning: a pretrained encoder on a new labeled dataset, plus extract and export.

SimCLR v1 section 6 (appendix B.8) evaluates transfer in two ways, a linear classifier on frozen
features and fine-tuning of the whole network; the seed paper's Study 3 (their Table 4) trains new
linear layers on a frozen SimCLR ResNet-50 with random crop + flip, lr 0.1, no weight decay, batch
32 or 64, a short schedule. Three modes:

    linear-cached  frozen encoder, features of the un-augmented images computed once, a linear layer
                   trained on them (train.train_linear; the fastest; v1's linear transfer uses no
                   augmentation)
    linear-aug     frozen encoder (weights and batch-norm statistics), features recomputed every step
                   on augmented inputs, only the linear layer learns (the seed paper's Study 3)
    finetune       every weight trained (v1's fine-tuning protocol)

Encoder sources:
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
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import augment
import data
import distill
import models
import train
from train import UserError

MODES = ("linear-cached", "linear-aug", "finetune")

# name -> (mean, std) of the inputs a network was trained on, in [0, 1] units.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's supervised weights
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),                  # SimCLR: raw [0, 1] inputs
}

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


# ----------------------------------------------------------------------------------------------
# Encoder sources


@dataclass
class Encoder:
    """A pretrained encoder and what is needed to use and describe it.

    arch: train.build_simclr_model's description (encoder, width, cifar_stem, head_layers,
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
    raw = train.load_tensors_only(path, "cpu", what="", hint="It may be damaged or not a PyTorch file; expected a "
                                  "checkpoint of this project or a torchvision-layout state dict.")
    if isinstance(raw, dict) and "kind" in raw:
        return _project_encoder(path, raw, arch, width, cifar_stem, normalize, head_layer)
    return _torchvision_encoder(path, state_dict_from(raw, path), arch, width, cifar_stem, normalize, head_layer)


def _project_encoder(path, ckpt: dict, arch, width, cifar_stem, normalize, head_layer) -> Encoder:
    if normalize is not None:
        raise UserError(f"--normalize applies to torchvision-layout files only; '{path}' records its own "
                        f"normalisation (mean {ckpt.get('mean', ckpt.get('arch', {}).get('mean'))}).")
    if ckpt["kind"] == "pretrain":
        model, ckpt = train.load_pretrained(path)
        a = ckpt["arch"]
        _check_requested(path, a, arch, width, cifar_stem, model.encoder)
        head_layer = head_layer or 0
        if head_layer > a["head_layers"]:
            raise UserError(f"--head-layer {head_layer} is deeper than the {a['head_layers']}-layer projection "
                            f"head of '{path}'.")
        return Encoder(model.encoder, model.head if head_layer else None, head_layer, a, list(ckpt["mean"]),
                       list(ckpt["std"]), int(ckpt["image_size"]), "pretrain", str(path))
    model, ckpt = distill.load_classifier(path)
    a = {k: ckpt["arch"][k] for k in _ARCH_KEYS}
    _check_requested(path, a, arch, width, cifar_stem, model.encoder)
    if head_layer not in (None, model.head_layer):
        raise UserError(f"'{path}' is a classifier using projection-head layer {model.head_layer}; "
                        f"--head-layer {head_layer} cannot be chosen for it.")
    return Encoder(model.encoder, model.head, model.head_layer, a, model.mean.flatten().tolist(),
                   model.std.flatten().tolist(), int(ckpt.get("image_size") or 32), "classifier", str(path),
                   classifier=model, classes=ckpt.get("classes"))


def _check_requested(path, have: dict, arch, width, cifar_stem, encoder: nn.Module) -> None:
    """A project checkpoint carries its architecture; a different one asked for is reported with the
    keys and shapes that do not fit, as for a torchvision file."""
    want = dict(encoder=arch or have["encoder"], width=have["width"] if width is None else width,
                cifar_stem=have["cifar_stem"] if cifar_stem is None else cifar_stem)
    if all(want[k] == have[k] for k in want):
        return
    try:
        target = models.create_model(want["encoder"], 0, want["width"], want["cifar_stem"])
        train.load_state(target, encoder.state_dict(), "The encoder", path)
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
        train.load_state(encoder, kept, f"The {arch} weights", path)
    except UserError as e:
        raise UserError(f"{e} (Loaded as --arch {arch} --width {width} --cifar-stem {cifar_stem}; the classifier "
                        "keys fc.* / classifier.* are ignored.)") from None
    dropped = [k for k in state if k not in kept]
    print(f"'{path}': {len(kept)} tensors loaded strictly into {arch} (width {width}); the classifier's "
          f"{len(dropped)} ignored ({', '.join(dropped[:4])}{' ...' if len(dropped) > 4 else ''}); input "
          f"normalisation mean {list(mean)} std {list(std)}.", file=sys.stderr)
    a = dict(encoder=arch, width=width, cifar_stem=cifar_stem, head_layers=1, head_hidden=None, out_dim=1)
    return Encoder(encoder, None, 0, a, list(mean), list(std), int(side.get("image_size", 224)), "torchvision",
                   str(path))


def classifier_for(enc: Encoder, num_classes: int) -> tuple[distill.DenseClassifier, dict]:
    """A new linear classifier on `enc` and its checkpoint description (mean/std included)."""
    model = distill.DenseClassifier(enc.encoder, enc.head, enc.head_layer, num_classes, enc.mean, enc.std)
    arch = train.classifier_arch(enc.arch, enc.head_layer, num_classes, enc.mean, enc.std)
    return model, arch


# ----------------------------------------------------------------------------------------------
# Transfer


def transfer(source: str | os.PathLike, task_name: str, out: str | os.PathLike, *, mode: str | None = None,
             preset: str = "simclr", arch: str | None = None, width: float | None = None,
             cifar_stem: bool | None = None, normalize: str | None = None, head_layer: int | None = None,
             image_size: int | None = None, crop: bool | None = None, flip: bool | None = None,
             color: bool | None = None, epochs: int | None = None, batch_size: int | None = None,
             lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None,
             seed: int = 0, device: str = "auto", root: str | None = None, cache_dir: str | None = None,
             skip_bad: bool = False, resume: bool = False, overwrite: bool = False, log_every: int = 20,
             task: data.TaskData | None = None) -> dict:
    """Train a new linear layer (or fine-tune everything) on `task_name` from the encoder in `source`.

    Settings left as None come from PRESETS[preset]. Returns dict(val=..., test=... reports with top1,
    top5 (more than 5 classes) and per_class, best=<best.pt>, ...); best.pt is a classifier checkpoint
    (train.load_classifier) chosen by val top-1 in the trained modes (linear-cached keeps the last)."""
    if preset not in PRESETS:
        raise UserError(f"Unknown --preset '{preset}'. Use one of: {', '.join(PRESETS)}.")
    p = PRESETS[preset]
    mode = mode or p["mode"]
    if mode not in MODES:
        raise UserError(f"Unknown --mode '{mode}'. Use one of: {', '.join(MODES)}.")
    if mode == "linear-cached" and any(v for v in (crop, flip, color)):
        raise UserError("--mode linear-cached computes features once on un-augmented images; augmentation needs "
                        "--mode linear-aug or finetune.")
    epochs = p["epochs"] if epochs is None else epochs
    batch_size = p["batch_size"] if batch_size is None else batch_size
    if lr is None:
        lr = p["base_lr"] * batch_size / 256 if p["lr_scaling"] == "linear" else p["base_lr"]
    momentum = p["momentum"] if momentum is None else momentum
    weight_decay = p["weight_decay"] if weight_decay is None else weight_decay
    crop, flip, color = (p[k] if v is None else v for k, v in (("crop", crop), ("flip", flip), ("color", color)))
    train.check_positive(epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size)

    dev = train.select_device(device)
    train.seed_everything(seed)
    enc = load_encoder(source, arch=arch, width=width, cifar_stem=cifar_stem, normalize=normalize,
                       head_layer=head_layer)
    image_size = image_size or enc.image_size
    distill.check_input_size(enc.arch["encoder"], image_size)
    task = task or data.load_task(task_name, image_size=image_size, root=root, seed=seed, cache_dir=cache_dir,
                                  skip_bad=skip_bad)
    if batch_size > len(task.train):
        raise UserError(f"--batch-size {batch_size} is larger than the {len(task.train)} training images of "
                        f"'{task.name}'. Use a batch of at most {len(task.train)}.")
    model, cls_arch = classifier_for(enc, task.num_classes)
    model = model.to(dev)
    if mode != "finetune":
        model.freeze_base()
    frozen_parts = nn.ModuleDict({"encoder": model.encoder, **({"head": model.head} if model.head is not None else {})})
    frozen = {k: v.clone() for k, v in frozen_parts.state_dict().items()} if mode != "finetune" else None
    run = (train.RunFolder.redo(out, "transfer", resume, overwrite) if mode == "linear-cached"
           else train.RunFolder(out, resume=resume, overwrite=overwrite))
    augmentation = (augment.SimCLRAugment(image_size, crop=crop, flip=flip, color=color, blur=False, strength=0.5)
                    if mode != "linear-cached" and (crop or flip or color) else None)
    described = augmentation.describe() if augmentation else "none"
    config = dict(stage="transfer", source=str(source), source_kind=enc.kind, arch=enc.arch, head_layer=enc.head_layer,
                  mean=enc.mean, std=enc.std, task=task.name, mode=mode, preset=preset, augmentation=described,
                  epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                  image_size=image_size, seed=seed, device=str(dev))
    if not run.resuming:
        run.write_config(config)
    print(f"transfer: {enc.arch['encoder']} (width {enc.arch['width']}, {enc.kind} '{source}', mean {enc.mean}, "
          f"std {enc.std}) -> {task.name} ({task.num_classes} classes, {len(task.train)} train images at "
          f"{image_size}px), {mode}, augment {described}, lr {lr:.4g}, wd {weight_decay}, batch {batch_size}, "
          f"{epochs} epochs, device {dev}", file=sys.stderr)
    meta = dict(kind="transfer", arch=cls_arch, classes=task.classes, image_size=image_size, config=json.dumps(config))

    if mode == "linear-cached":
        model.eval()
        feats = {name: train.extract_features(model.base, split, dev, size=image_size, desc=f"features {name}")
                 for name, split in (("train", task.train), ("val", task.val), ("test", task.test))}
        labels = torch.as_tensor(np.asarray(task.train.labels), device=dev, dtype=torch.long)
        model.fc = train.train_linear(feats["train"], labels, task.num_classes, epochs, batch_size, lr,
                                       weight_decay=weight_decay, seed=seed, momentum=momentum)
        run.save(dict(meta, format=train.CHECKPOINT_FORMAT, model=model.state_dict()), "best.pt")
        with torch.no_grad():
            reports = {name: train.accuracy_report(model.fc(feats[name]), split.labels, task.classes)
                       for name, split in (("val", task.val), ("test", task.test))}
    else:
        view = augmentation if augmentation is not None else (lambda x, g: train.to_float(x, image_size))
        loader = data.BatchLoader(task.train, batch_size, dev, shuffle=True, drop_last=True, seed=seed)
        schedule = train.Schedule(epochs=epochs, lr=lr, optimizer="sgd", momentum=momentum,
                                   weight_decay=weight_decay, log_every=log_every)
        evaluate = lambda: dict(val_top1=train.evaluate_classifier(model, task.val, dev, size=image_size)["top1"])
        train.fit(model, train.supervised_loss_fn(model, view), loader, run, schedule, device=dev, seed=seed,
                   meta=meta, evaluate=evaluate, select="val_top1", desc=f"transfer {mode} {task.name}")
        best, _ = distill.load_classifier(run.path / "best.pt", task.num_classes)
        best = best.to(dev)
        reports = {name: train.evaluate_classifier(best, split, dev, size=image_size)
                   for name, split in (("val", task.val), ("test", task.test))}
    if frozen is not None:
        train.check_frozen(frozen, frozen_parts)
    for r in reports.values():
        r.pop("predictions")
    result = dict(task=task.name, mode=mode, preset=preset, source=str(source), classes=task.num_classes,
                  best=str(run.path / "best.pt"), **reports)
    train.atomic_write_text(json.dumps(result, indent=2) + "\n", run.path / "results.json")
    test = reports["test"]
    top5 = f", top-5 {test['top5']:.4f}" if "top5" in test else ""
    worst = sorted(test["per_class"].items(), key=lambda kv: kv[1])[:3]
    print(f"transfer {task.name} ({mode}): val top-1 {reports['val']['top1']:.4f}, test top-1 {test['top1']:.4f}{top5}; "
          f"weakest classes: " + ", ".join(f"{k} {v:.2f}" for k, v in worst) + f"; best: {result['best']}",
          file=sys.stderr)
    return result


# ----------------------------------------------------------------------------------------------
# Utilities: extract features or predictions for a folder, export an encoder


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
    for f in (npy, index):
        if f.exists() and not overwrite:
            raise UserError(f"'{f}' exists already. Pass --overwrite to replace it, or choose another --out.")
    enc = load_encoder(source, arch=arch, width=width, cifar_stem=cifar_stem, normalize=normalize, head_layer=head_layer)
    if what == "predictions" and enc.classifier is None:
        raise UserError(f"--what predictions needs a classifier checkpoint (best.pt of a finetune, distill or "
                        f"transfer run); '{source}' is a {enc.kind} encoder. Use --what features.")
    dev = train.select_device(device)
    image_size = image_size or enc.image_size
    distill.check_input_size(enc.arch["encoder"], image_size)
    pixels, files = data.load_folder_images(images, image_size, cache_dir=cache_dir, skip_bad=skip_bad)
    folder = data.ImageSet(pixels, None, [])
    if enc.classifier is not None:
        net = enc.classifier.to(dev).eval()
        fn = net if what == "predictions" else net.features
    else:
        net, _ = classifier_for(enc, 1)  # the fc is never used: features only
        net = net.to(dev).eval()
        fn = net.base
    values = train.extract_features(fn, folder, dev, batch_size, size=image_size, desc="extract").cpu().numpy()
    record = dict(source=str(source), images=str(images), what=what, shape=list(values.shape), image_size=image_size,
                  mean=enc.mean, std=enc.std, files=list(files))
    if what == "predictions":
        record["classes"] = list(enc.classes or [])
        record["predicted"] = [record["classes"][i] if record["classes"] else int(i) for i in values.argmax(1)]
    out.parent.mkdir(parents=True, exist_ok=True)
    train.atomic_write(npy, lambda f: np.save(f, values.astype(np.float32)))
    train.atomic_write_text(json.dumps(record, indent=1) + "\n", index)
    print(f"extract: {what} {values.shape} of {len(files)} images under '{images}' -> {npy}, {index}", file=sys.stderr)
    return dict(npy=str(npy), index=str(index), shape=list(values.shape))


def export(source: str | os.PathLike, out: str | os.PathLike, *, arch: str | None = None, width: float | None = None,
           cifar_stem: bool | None = None, normalize: str | None = None, overwrite: bool = False) -> dict:
    """Write the encoder of `source` as a plain torchvision-layout state dict (names -> tensors, no
    classifier) to `out`, and its description (arch, width, cifar_stem, mean, std, image_size) to
    <out>.json, which load_encoder reads back. torchvision's resnetXX() / vggXX() of the same width
    loads the file with strict=False, reporting only the classifier (fc.* / classifier.*) as missing;
    an encoder with the CIFAR stem (3x3 conv1) needs that conv1 swapped in first. Projection-head
    layers are not part of the export."""
    out = Path(out)
    side = Path(str(out) + ".json")
    for f in (out, side):
        if f.exists() and not overwrite:
            raise UserError(f"'{f}' exists already. Pass --overwrite to replace it, or choose another --out.")
    enc = load_encoder(source, arch=arch, width=width, cifar_stem=cifar_stem, normalize=normalize)
    state = {k: v.detach().cpu().clone() for k, v in enc.encoder.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    train.atomic_save(state, out)
    description = dict(format="torchvision-state-dict", arch=enc.arch["encoder"], width=enc.arch["width"],
                       cifar_stem=enc.arch["cifar_stem"], mean=enc.mean, std=enc.std, image_size=enc.image_size,
                       source=str(source))
    train.atomic_write_text(json.dumps(description, indent=2) + "\n", side)
    print(f"export: {len(state)} tensors of {description['arch']} (width {description['width']}) -> {out} "
          f"(+ {side.name}: normalisation mean {enc.mean} std {enc.std})", file=sys.stderr)
    return dict(path=str(out), description=str(side), keys=len(state))


# ----------------------------------------------------------------------------------------------
# Command line


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", "--encoder-weights", dest="source", required=True,
                   help="a checkpoint of this project, or a torchvision-layout ResNet/VGG state dict (.pt/.pth)")
    p.add_argument("--arch", default=None, choices=models.MODEL_NAMES,
                   help="network of a torchvision-layout file; None: its export side-car")
    p.add_argument("--width", type=float, default=None, help="channel multiplier of a torchvision-layout file (1)")
    p.add_argument("--cifar-stem", type=train.bool_arg, default=None,
                   help="3x3 stem in a torchvision-layout file; None: off, as torchvision")
    p.add_argument("--normalize", default=None, choices=list(NORMALIZATIONS),
                   help="input normalisation of a torchvision-layout file; None: imagenet "
                        "(converted SimCLR weights need none); project checkpoints carry their own")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=train.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="transfer to a labeled dataset", formatter_class=train.HelpFormatter,
                       epilog="presets: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    _source_args(t)
    t.add_argument("--data", default="shapes47", help="labeled task: an embedded name, a dataset name or a folder")
    t.add_argument("--preset", default="simclr", choices=list(PRESETS),
                   help="simclr: SimCLR v1's transfer protocol; paper: the seed paper's Study 3")
    t.add_argument("--mode", default=None, choices=MODES, help="None: the preset's (simclr: linear-cached, paper: linear-aug)")
    t.add_argument("--head-layer", type=int, default=None, help="features after this projection-head layer (0: encoder)")
    t.add_argument("--image-size", type=int, default=None, help="working size; None: the source's")
    for name in ("crop", "flip", "color"):
        t.add_argument(f"--{name}", type=train.bool_arg, default=None, help=f"{name} augmentation; None: the preset's")
    t.add_argument("--epochs", type=int, default=None, help="None: the preset's")
    t.add_argument("--batch-size", type=int, default=None, help="None: the preset's")
    t.add_argument("--lr", type=float, default=None, help="peak lr, used as given; None: preset's, scaled by batch")
    t.add_argument("--momentum", type=float, default=None, help="None: the preset's")
    t.add_argument("--weight-decay", type=float, default=None, help="None: the preset's")
    t.add_argument("--log-every", type=int, default=20, help="steps between log lines (host syncs)")
    train.add_common(t)
    train.add_run(t)

    e = sub.add_parser("extract", help="features or predictions for a folder of images",
                       formatter_class=train.HelpFormatter)
    _source_args(e)
    e.add_argument("--images", required=True, help="folder of images (searched recursively)")
    e.add_argument("--out", required=True, help="output prefix: writes <out>.npy and <out>.json")
    e.add_argument("--what", default="features", choices=["features", "predictions"],
                   help="encoder features, or class predictions of a classifier checkpoint")
    e.add_argument("--head-layer", type=int, default=None, help="features after this projection-head layer")
    e.add_argument("--image-size", type=int, default=None, help="working size; None: the source's")
    e.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    e.add_argument("--skip-bad", action="store_true", help="leave unreadable images out with a warning")
    e.add_argument("--cache-dir", default=None, help="cache for decoded image folders; None: data.py's default")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files")

    x = sub.add_parser("export", help="an encoder as a plain torchvision-layout state dict",
                       formatter_class=train.HelpFormatter)
    _source_args(x)
    x.add_argument("--out", required=True, help="the .pt file to write (plus <out>.json with its normalisation)")
    x.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def run_command(args: argparse.Namespace) -> None:
    source = dict(arch=args.arch, width=args.width, cifar_stem=args.cifar_stem, normalize=args.normalize)
    if args.command == "train":
        transfer(args.source, args.data, args.out, mode=args.mode, preset=args.preset, head_layer=args.head_layer,
                 image_size=args.image_size, crop=args.crop, flip=args.flip, color=args.color, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                 seed=args.seed, device=args.device, root=args.root, cache_dir=args.cache_dir, skip_bad=args.skip_bad,
                 resume=args.resume, overwrite=args.overwrite, log_every=args.log_every, **source)
    elif args.command == "extract":
        extract(args.source, args.images, args.out, what=args.what, head_layer=args.head_layer,
                image_size=args.image_size, batch_size=args.batch_size, device=args.device,
                cache_dir=args.cache_dir, skip_bad=args.skip_bad, overwrite=args.overwrite, **source)
    elif args.command == "export":
        export(args.source, args.out, overwrite=args.overwrite, **source)


def main(argv: list[str] | None = None) -> int:
    return train.main(argv, run=run_command, parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
