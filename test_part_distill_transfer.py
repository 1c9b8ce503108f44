"""Tests of distill.py and transfer.py (CPU, tiny networks, generated data; no network, no downloads).

Pretraining checkpoints are written directly in simclr.py's format from a randomly initialised
narrow ResNet-18 whose batch-norm statistics are calibrated on the task's images (so its features
have the scale a trained network's would), and the teacher is written in simclr.finetune's format.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import distill
import models
import simclr
import transfer

SIZE = 16
ARCH = dict(encoder="resnet18", width=0.125, cifar_stem=True, head_layers=2, head_hidden=None, out_dim=16)
CPU = torch.device("cpu")


def as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255


def save_pretrain(path, seed: int, images: np.ndarray, arch: dict = ARCH):
    """A pretraining checkpoint as simclr.pretrain writes it: random weights, BN statistics of `images`."""
    torch.manual_seed(seed)
    model = simclr.build_simclr_model(arch)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None  # cumulative average: one pass gives the statistics of all of `images`
    with torch.no_grad():
        model.train()(as_float(images))
    for m in bns:
        m.momentum = 0.1
    simclr.atomic_save(dict(kind="pretrain", format=simclr.CHECKPOINT_FORMAT, arch=arch, model=model.state_dict(),
                            image_size=SIZE, mean=[0.0] * 3, std=[1.0] * 3, config="{}"), path)
    return path


def save_teacher(path, origin, task: data.TaskData, sharpness: float = 4.0):
    """A fixed teacher in simclr.finetune's checkpoint format: the encoder of `origin` and a linear
    layer that bins (at the train quantiles) the feature direction that best predicts an image's
    brightness. A simple, smooth function of the image, so a small student can learn it from ~200
    images; its predictions are spread evenly over the classes."""
    pre, ckpt = simclr.load_pretrained(origin)
    clf = simclr.Classifier(pre.encoder, None, 0, task.num_classes).eval()
    with torch.no_grad():
        f = clf.features(as_float(task.train.images)).double()
        mu = f.mean(0)
        brightness = as_float(task.train.images).mean((1, 2, 3)).double()
        u = torch.linalg.lstsq(f - mu, (brightness - brightness.mean())[:, None]).solution[:, 0]
        z = (f - mu) @ u
        c = torch.arange(task.num_classes, dtype=torch.float64)
        cuts = torch.quantile(z, c[1:] / task.num_classes)
        # logit_c = c z - sum_{k<c} cut_k: argmax is the bin of z between consecutive cuts.
        offsets = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(cuts, 0)])
        clf.fc.weight.copy_((sharpness / z.std() * c[:, None] * u[None, :]).float())
        clf.fc.bias.copy_((sharpness / z.std() * (-c * (mu @ u) - offsets)).float())
    arch = simclr.classifier_arch(ckpt["arch"], 0, task.num_classes)
    simclr.atomic_save(dict(kind="finetune", format=simclr.CHECKPOINT_FORMAT, arch=arch, model=clf.state_dict(),
                            classes=task.classes, image_size=SIZE, config=json.dumps(dict(checkpoint=str(origin)))),
                       path)
    return path


def relabelled(task: data.TaskData, teacher) -> data.TaskData:
    """The task with the teacher's predictions as labels, so that val selection of the student
    (on 'ground truth') selects the epoch that agrees best with the teacher."""
    def split(s):
        pred = simclr.evaluate_classifier(teacher, s, CPU)["predictions"]
        return data.ImageSet(s.images, np.asarray(pred, dtype=np.int64), s.classes)
    return data.TaskData(task.name, split(task.train), split(task.val), split(task.test), task.classes)


def colour_task(n_train: int = 120, n_val: int = 30, n_test: int = 60, seed: int = 0) -> data.TaskData:
    """Three classes told apart by their dominant colour channel, with random brightness and noise."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.arange(n) % 3
        base = rng.uniform(0.1, 0.4, (n, 1, 1, 3))
        base[np.arange(n), 0, 0, labels] += rng.uniform(0.3, 0.5, n)
        img = base + rng.normal(0, 0.08, (n, SIZE, SIZE, 3))
        return data.ImageSet((np.clip(img, 0, 1) * 255).astype(np.uint8), labels.astype(np.int64), ["r", "g", "b"])
    return data.TaskData("colours", split(n_train), split(n_val), split(n_test), ["r", "g", "b"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """shapes2 at 16 px, a teacher, its pretraining origin and a separately pretrained student base."""
    root = tmp_path_factory.mktemp("world")
    task = data.load_task("shapes2", image_size=SIZE, n_train=200, n_test=100, seed=0)
    origin = save_pretrain(root / "origin.pt", 1, task.train.images)
    teacher = save_teacher(root / "teacher.pt", origin, task)
    base = save_pretrain(root / "student_base.pt", 2, task.train.images)
    model, _ = simclr.load_classifier(teacher, task.num_classes)
    return dict(root=root, task=task, origin=origin, teacher=teacher, base=base,
                relabelled=relabelled(task, model.eval()))


def majority(labels) -> float:
    return float(np.bincount(np.asarray(labels)).max() / len(labels))


# --- distillation ------------------------------------------------------------------------------------


def test_distilled_student_agrees_with_fixed_teacher(world, tmp_path):
    task = world["relabelled"]
    res = distill.distill(world["teacher"], "shapes2", tmp_path / "kd", width=0.125, mode="scratch", epochs=4,
                          batch_size=32, lr=0.1, crop=False, flip=False, device="cpu", task=task, log_every=100)
    chance = majority(task.test.labels)  # what a constant student would agree
    # Seeded runs (seeds 0-2) agreed 0.74-0.84 on test against a majority rate of 0.52; without
    # learning from the soft labels a student stays near chance.
    assert res["agreement"]["test"] > chance + 0.15, (res["agreement"], chance)
    assert res["teacher"]["test"]["top1"] == 1.0  # the labels are the teacher's own predictions
    student, meta = simclr.load_classifier(res["best"], 2)  # a plain student loads with the shared loader
    assert meta["kind"] == "distill" and meta["arch"]["encoder"] == "resnet18"


def test_frozen_base_never_changes_and_dense_layers_learn(world, tmp_path):
    task = world["relabelled"]
    # Flip augmentation: the base runs every step, so a BN layer in training mode would drift.
    res = distill.distill(world["teacher"], "shapes2", tmp_path / "kd", mode="frozen", student="resnet18",
                          width=0.125, student_checkpoint=world["base"], dense_layers=(32,), epochs=3,
                          batch_size=32, lr=0.1, crop=False, flip=True, device="cpu", task=task, log_every=100)
    base = simclr.load_checkpoint(world["base"])["model"]
    student, meta = distill.load_classifier(res["best"], 2)
    for k, v in student.encoder.state_dict().items():
        assert torch.equal(v, base["encoder." + k]), k
    assert meta["arch"]["dense_layers"] == [32] and isinstance(student.dense[0], nn.Linear)
    # The trained part did change.
    assert not torch.equal(student.fc.weight, torch.zeros_like(student.fc.weight))
    # Seeded cached runs agreed 0.64-0.67 against a majority rate of 0.52.
    assert res["agreement"]["test"] > majority(task.test.labels) + 0.05, res["agreement"]


def test_frozen_base_cached_features_match_forward(world, tmp_path):
    res = distill.distill(world["teacher"], "shapes2", tmp_path / "kd", mode="frozen", width=0.125,
                          student_checkpoint=world["base"], dense_layers=(16,), epochs=2, batch_size=32,
                          preset="paper", device="cpu", task=world["task"], log_every=100)
    config = json.loads((tmp_path / "kd" / "config.json").read_text())
    assert config["cached_base_features"] and config["soft_labels_effective"] == "precomputed"
    assert config["lr"] == 0.01 and config["weight_decay"] == 1e-4 and config["temperature"] == 1.0
    assert 0.0 <= res["student"]["test"]["top1"] <= 1.0


def test_frozen_base_must_not_be_the_teachers_encoder(world, tmp_path):
    common = dict(mode="frozen", width=0.125, epochs=1, batch_size=32, device="cpu", task=world["task"])
    with pytest.raises(data.UserError, match="teacher's own pretrained encoder"):
        distill.distill(world["teacher"], "shapes2", tmp_path / "a", student_checkpoint=world["origin"], **common)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(world["origin"].read_bytes())
    with pytest.raises(data.UserError, match="identical weights"):
        distill.distill(world["teacher"], "shapes2", tmp_path / "b", student_checkpoint=copy, **common)
    with pytest.raises(data.UserError, match="needs --student-checkpoint"):
        distill.distill(world["teacher"], "shapes2", tmp_path / "c", **common)


def test_student_checkpoint_of_another_architecture_lists_keys_and_shapes(world, tmp_path):
    with pytest.raises(data.UserError, match=r"wrong shapes: conv1\.weight") as e:
        distill.distill(world["teacher"], "shapes2", tmp_path / "a", mode="finetune", width=0.25,
                        student_checkpoint=world["base"], epochs=1, batch_size=32, device="cpu", task=world["task"])
    assert "pretrained as resnet18 width 0.125" in str(e.value)
    with pytest.raises(data.UserError, match=r"missing keys: layer1\.2\."):
        distill.distill(world["teacher"], "shapes2", tmp_path / "b", mode="frozen", student="resnet34", width=0.125,
                        student_checkpoint=world["base"], epochs=1, batch_size=32, device="cpu", task=world["task"])
    with pytest.raises(data.UserError, match="vgg11 needs images of at least 32 px"):
        distill.distill(world["teacher"], "shapes2", tmp_path / "c", mode="frozen", student="vgg11", width=0.125,
                        student_checkpoint=world["base"], epochs=1, batch_size=32, device="cpu", task=world["task"])


def test_labeled_indices_are_the_images_fine_tuning_used():
    task = colour_task()
    index = distill.labeled_indices(task.train, 0.25, seed=3)
    subset = data.labeled_fraction(task.train, 0.25, seed=3)
    assert np.array_equal(task.train.images[index], subset.images)
    assert np.array_equal(task.train.labels[index], subset.labels)


def test_label_term_uses_known_rows_only():
    def encoder():
        e = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
        e.feature_dim = 4
        return e
    torch.manual_seed(0)
    student = distill.DenseClassifier(encoder(), None, 0, 3, dense_layers=(5,))
    teacher = distill.DenseClassifier(encoder(), None, 0, 3)
    view = lambda x, g: simclr.to_float(x)
    x = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    index = torch.arange(4)
    hidden = torch.full((4,), -1)
    known = torch.tensor([2, -1, 0, -1])
    soft = distill.distillation_loss_fn(student, teacher, view, 1.0, 1.0, None)(x, index, None)
    none_known = distill.distillation_loss_fn(student, teacher, view, 1.0, 0.5, hidden)(x, index, None)
    torch.testing.assert_close(none_known, 0.5 * soft)  # no labeled row: the label term is 0, not NaN
    mixed = distill.distillation_loss_fn(student, teacher, view, 1.0, 0.5, known)(x, index, None)
    logits = student(simclr.to_float(x))
    ce = nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([2, 0]))
    torch.testing.assert_close(mixed, 0.5 * soft + 0.5 * ce)


# --- transfer ----------------------------------------------------------------------------------------


def test_linear_probe_beats_chance(world, tmp_path):
    task = colour_task()
    res = transfer.transfer(world["base"], "colours", tmp_path / "t", mode="linear-cached", epochs=30, batch_size=32,
                            device="cpu", task=task)
    # Three colour classes (chance 1/3) that any convolutional encoder's pooled features separate;
    # a seeded run reaches about 1.0.
    assert res["test"]["top1"] > 0.6, res["test"]
    assert set(res["test"]["per_class"]) == {"r", "g", "b"} and "top5" not in res["test"]
    model, meta = simclr.load_classifier(res["best"], 3)
    assert meta["kind"] == "transfer" and meta["arch"]["mean"] == [0.0, 0.0, 0.0]
    again = simclr.evaluate_classifier(model, task.test, CPU)
    assert again["top1"] == pytest.approx(res["test"]["top1"])


def test_torchvision_state_dict_loads_and_linear_aug_keeps_encoder_frozen(tmp_path):
    torch.manual_seed(0)
    net = models.resnet18(num_classes=1000, width=0.125)  # torchvision's layout, fc included
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    enc = transfer.load_encoder(tmp_path / "tv.pth", arch="resnet18", width=0.125)
    assert enc.kind == "torchvision" and enc.mean == list(transfer.NORMALIZATIONS["imagenet"][0])
    x = torch.rand(2, 3, 32, 32)
    net.fc = nn.Identity()
    torch.testing.assert_close(enc.encoder.eval()(x), net.eval()(x))
    res = transfer.transfer(tmp_path / "tv.pth", "colours", tmp_path / "t", arch="resnet18", width=0.125,
                            normalize="none", image_size=SIZE, preset="paper", epochs=2, batch_size=32,
                            device="cpu", task=colour_task())
    model, meta = simclr.load_classifier(res["best"], 3)
    assert meta["arch"]["std"] == [1.0, 1.0, 1.0] and meta["arch"]["cifar_stem"] is False
    for k, v in model.encoder.state_dict().items():  # BN statistics included
        assert torch.equal(v, enc.encoder.state_dict()[k]), k


def test_encoder_file_that_does_not_fit_is_reported(tmp_path):
    torch.save(models.resnet18(num_classes=10, width=0.125).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(data.UserError, match=r"missing keys: layer1\.2\.") as e:
        transfer.load_encoder(tmp_path / "r18.pth", arch="resnet34", width=0.125)
    assert "r18.pth" in str(e.value)
    with pytest.raises(data.UserError, match=r"wrong shapes: conv1\.weight: checkpoint \(8, 3, 7, 7\) vs model \(16, 3, 7, 7\)"):
        transfer.load_encoder(tmp_path / "r18.pth", arch="resnet18", width=0.25)
    with pytest.raises(data.UserError, match="--arch"):
        transfer.load_encoder(tmp_path / "r18.pth")
    torch.save({"backbone.w": torch.zeros(2)}, tmp_path / "odd.pt")
    with pytest.raises(data.UserError, match="unknown layout"):
        transfer.load_encoder(tmp_path / "odd.pt", arch="resnet18")


def test_export_then_reload_round_trip(world, tmp_path):
    out = transfer.export(world["base"], tmp_path / "enc.pt")
    state = torch.load(out["path"], weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    net = models.resnet18(num_classes=7, width=0.125, cifar_stem=True)  # torchvision's names, fc included
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    original = simclr.load_pretrained(world["base"])[0].encoder.eval()
    back = transfer.load_encoder(tmp_path / "enc.pt")  # arch, stem and normalisation from the side-car
    assert back.mean == [0.0, 0.0, 0.0] and back.arch["cifar_stem"] is True
    for k, v in original.state_dict().items():
        assert torch.equal(back.encoder.state_dict()[k], v), k
    x = torch.rand(3, 3, SIZE, SIZE)
    torch.testing.assert_close(back.encoder.eval()(x), original(x), rtol=0, atol=0)


def test_extract_features_and_predictions_for_a_folder(world, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = world["task"].test.images[:5]
    names = ["a.png", "b.png", "sub/c.png", "sub/d.png", "z.png"]
    for name, img in zip(names, images):
        Image.fromarray(img).save(folder / name)
    kw = dict(device="cpu", cache_dir=tmp_path / "cache")
    feats = transfer.extract(world["base"], folder, tmp_path / "feats", **kw)
    values = np.load(feats["npy"])
    index = json.loads((tmp_path / "feats.json").read_text())
    assert values.shape == (5, 64) and index["files"] == sorted(names)
    preds = transfer.extract(world["teacher"], folder, tmp_path / "preds", what="predictions", **kw)
    record = json.loads((tmp_path / "preds.json").read_text())
    assert np.load(preds["npy"]).shape == (5, 2) and set(record["predicted"]) <= set(world["task"].classes)
    with pytest.raises(data.UserError, match="needs a classifier checkpoint"):
        transfer.extract(world["base"], folder, tmp_path / "x", what="predictions", **kw)


def test_batch_larger_than_dataset_is_refused(world, tmp_path):
    with pytest.raises(data.UserError, match="--batch-size 500 is larger than the 120"):
        transfer.transfer(world["base"], "colours", tmp_path / "t", batch_size=500, device="cpu", task=colour_task())
    with pytest.raises(data.UserError, match="--batch-size 1000 is larger than the 180 distillation images"):
        distill.distill(world["teacher"], "shapes2", tmp_path / "d", batch_size=1000, device="cpu", task=world["task"])


# --- command lines -----------------------------------------------------------------------------------


def test_cli_errors_exit_2_with_a_message(world, tmp_path, capsys):
    code = distill.main(["--teacher", str(world["teacher"]), "--data", "shapes5", "--out", str(tmp_path / "d"),
                         "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "predicts 2 classes but the dataset has 5" in err and "Traceback" not in err
    torch.save({"backbone.w": torch.zeros(2)}, tmp_path / "odd.pt")
    code = transfer.main(["train", "--source", str(tmp_path / "odd.pt"), "--arch", "resnet18", "--out",
                          str(tmp_path / "t"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "odd.pt' is in an unknown layout" in err
    code = transfer.main(["export", "--source", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "e.pt")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        transfer.main(["--help"])
    assert "train" in capsys.readouterr().out
