"""Tests for losses.py and models.py (CPU; torchvision comparisons run only where it is installed)."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import losses
import models


# ----------------------------------------------------------------------------------------------
# NT-Xent
# ----------------------------------------------------------------------------------------------

def _nt_xent_loop(z1, z2, temperature):
    """SimCLR v1 eq. 1 written out anchor by anchor, in float64."""
    z = torch.cat([z1, z2]).double()
    z = z / z.pow(2).sum(dim=1, keepdim=True).sqrt()
    two_n = z.shape[0]
    n = two_n // 2
    total = 0.0
    for i in range(two_n):
        positive = i + n if i < n else i - n
        numerator = math.exp(float(z[i] @ z[positive]) / temperature)
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(two_n) if k != i)
        total += -math.log(numerator / denominator)
    return total / two_n


def _nt_xent_chunked(z1, z2, temperature, chunk=1024):
    """Eq. 1 in float64 for large N, a block of anchors at a time."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    two_n = z.shape[0]
    n = two_n // 2
    total = 0.0
    for start in range(0, two_n, chunk):
        rows = torch.arange(start, min(start + chunk, two_n))
        sims = z[rows] @ z.T / temperature
        positives = sims[torch.arange(len(rows)), (rows + n) % two_n]
        sims[torch.arange(len(rows)), rows] = -math.inf
        total += float((torch.logsumexp(sims, dim=1) - positives).sum())
    return total / two_n


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_nt_xent_matches_loop_reference(temperature):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    expected = _nt_xent_loop(z1, z2, temperature)
    got32 = losses.nt_xent(z1, z2, temperature)
    got64 = losses.nt_xent(z1.double(), z2.double(), temperature)
    assert got32.dtype == torch.float32 and got32.ndim == 0
    assert got64.dtype == torch.float64
    assert float(got32) == pytest.approx(expected, rel=1e-5)
    assert float(got64) == pytest.approx(expected, rel=1e-12)


def test_nt_xent_is_symmetric_in_views_and_invariant_to_scale():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    base = losses.nt_xent(z1, z2)
    assert torch.allclose(losses.nt_xent(z2, z1), base, rtol=1e-12)
    scales = torch.rand(6, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    assert torch.allclose(losses.nt_xent(z1 * scales, z2), base, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 16])
def test_nt_xent_identical_projections_give_log_2n_minus_1(n):
    z = torch.tensor([[0.3, -1.2, 2.0]]).repeat(n, 1)
    assert float(losses.nt_xent(z, z.clone(), 0.5)) == pytest.approx(math.log(2 * n - 1), abs=1e-6)


@pytest.mark.parametrize("temperature", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("n", [2, 5])
def test_nt_xent_orthogonal_images_identical_views(n, temperature):
    # Views of image i are both along axis i (with different lengths): similarity 1 to the
    # positive, 0 to the 2N-2 negatives.
    g = torch.Generator().manual_seed(3)
    base = torch.eye(n, n + 2, dtype=torch.float64)
    z1 = base * (torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5)
    z2 = base * (torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5)
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / temperature))
    assert float(losses.nt_xent(z1, z2, temperature)) == pytest.approx(expected, rel=1e-10)
    assert float(losses.nt_xent(z1.float(), z2.float(), temperature)) == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_gradcheck(temperature):
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: losses.nt_xent(a, b, temperature), (z1, z2))


def test_nt_xent_n1_is_zero_with_zero_gradient():
    z1 = torch.randn(1, 5, requires_grad=True)
    z2 = torch.randn(1, 5, requires_grad=True)
    loss = losses.nt_xent(z1, z2, 0.1)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.all(z1.grad == 0) and torch.all(z2.grad == 0)


@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e20])
def test_nt_xent_low_temperature_and_extreme_magnitudes(magnitude):
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    expected = _nt_xent_chunked(z1, z2, 0.05)
    a = (z1 * magnitude).requires_grad_()
    b = (z2 * magnitude).requires_grad_()
    loss = losses.nt_xent(a, b, 0.05)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_nt_xent_large_batch():
    g = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(4096, 8, generator=g), torch.randn(4096, 8, generator=g)
    z1.requires_grad_()
    loss = losses.nt_xent(z1, z2, 0.1)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(_nt_xent_chunked(z1.detach(), z2, 0.1), rel=1e-5)
    assert torch.isfinite(z1.grad).all()


def test_nt_xent_is_float32_under_autocast():
    g = torch.Generator().manual_seed(7)
    layer = torch.nn.Linear(32, 64)
    x1 = torch.randn(256, 32, generator=g)
    x2 = x1 + 0.3 * torch.randn(256, 32, generator=g)  # views alike, so the loss is far below log(511)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = layer(x1), layer(x2)
        assert z1.dtype == torch.bfloat16
        loss = losses.nt_xent(z1, z2, 0.1)
    assert loss.dtype == torch.float32
    # A bfloat16 matrix product inside would be off by ~1e-3 here; float32 on the same inputs is not.
    reference = losses.nt_xent(z1.float(), z2.float(), 0.1)
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)


def test_nt_xent_non_finite_projections():
    z = torch.randn(4, 3)
    bad = z.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="z2 contains NaN"):
        losses.nt_xent(z, bad)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="z1 contains NaN or infinite"):
        losses.nt_xent(bad, z)
    # Without the (synchronising) check the problem shows in the loss instead.
    assert not torch.isfinite(losses.nt_xent(bad, z, check_finite=False))


@pytest.mark.parametrize("z1, z2, match", [
    (torch.randn(4, 3), torch.randn(5, 3), "same shape"),
    (torch.randn(4, 3), torch.randn(4, 2), "same shape"),
    (torch.randn(3), torch.randn(3), r"shape \(N, D\)"),
    (torch.randn(2, 3, 4), torch.randn(2, 3, 4), r"shape \(N, D\)"),
    (torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64), "floating-point"),
    (torch.randn(0, 3), torch.randn(0, 3), "N >= 1"),
    (torch.randn(4, 0), torch.randn(4, 0), "D >= 1"),
    (torch.randn(4, 3), torch.randn(4, 3, device="meta"), "same device"),
    ([[1.0, 2.0]], [[1.0, 2.0]], "torch.Tensor"),
])
def test_nt_xent_bad_projections(z1, z2, match):
    with pytest.raises(ValueError, match=match):
        losses.nt_xent(z1, z2)
    with pytest.raises(ValueError, match=match):
        losses.nt_xent_global(z1, z2)


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan"), float("inf"), True, "0.5"])
def test_nt_xent_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        losses.nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature)


def test_nt_xent_global_without_process_group_is_nt_xent():
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    g = torch.Generator().manual_seed(8)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert torch.equal(losses.nt_xent_global(z1, z2, 0.2), losses.nt_xent(z1, z2, 0.2))


_GLOO_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import losses
    rank, world, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + folder + "/rendezvous",
                            rank=rank, world_size=world)
    data = torch.load(folder + "/inputs.pt")
    n = data["x1"].shape[0] // world
    part = slice(rank * n, (rank + 1) * n)
    # The same weight on every rank, as DDP keeps it; the projections differ per rank.
    weight = data["weight"].clone().requires_grad_()
    x1 = data["x1"][part].clone().requires_grad_()
    x2 = data["x2"][part].clone().requires_grad_()
    loss = losses.nt_xent_global(x1 @ weight, x2 @ weight, data["temperature"])
    loss.backward()
    torch.save({"loss": loss.detach(), "weight": weight.grad, "x1": x1.grad, "x2": x2.grad,
                "local": losses.nt_xent(x1 @ weight, x2 @ weight, data["temperature"]).detach()},
               folder + "/rank%d.pt" % rank)
    dist.destroy_process_group()
""")


def test_nt_xent_global_two_gloo_processes(tmp_path):
    world, n_global, temperature = 2, 6, 0.3
    g = torch.Generator().manual_seed(9)
    data = {"x1": torch.randn(n_global, 5, generator=g, dtype=torch.float64),
            "x2": torch.randn(n_global, 5, generator=g, dtype=torch.float64),
            "weight": torch.randn(5, 4, generator=g, dtype=torch.float64),
            "temperature": temperature}
    torch.save(data, tmp_path / "inputs.pt")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(losses.__file__)))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [subprocess.Popen([sys.executable, "-c", _GLOO_WORKER, str(r), str(world), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    weight = data["weight"].clone().requires_grad_()
    x1 = data["x1"].clone().requires_grad_()
    x2 = data["x2"].clone().requires_grad_()
    single = losses.nt_xent(x1 @ weight, x2 @ weight, temperature)
    single.backward()

    mean_loss = sum(r["loss"] for r in ranks) / world
    assert torch.allclose(mean_loss, single.detach(), rtol=1e-12)
    # The global negatives matter: a rank's loss differs from its purely local loss.
    assert not torch.allclose(ranks[0]["loss"], ranks[0]["local"], rtol=1e-3)
    # DDP averages parameter gradients over ranks; that average is the single-process gradient.
    assert torch.allclose(sum(r["weight"] for r in ranks) / world, weight.grad, rtol=1e-10, atol=1e-12)
    # Each rank's own inputs get d(sum of rank losses)/dx = world x the single-process gradient.
    n = n_global // world
    for r, result in enumerate(ranks):
        part = slice(r * n, (r + 1) * n)
        assert torch.allclose(result["x1"] / world, x1.grad[part], rtol=1e-10, atol=1e-12)
        assert torch.allclose(result["x2"] / world, x2.grad[part], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------

def _distill_by_hand(student, teacher, temperature):
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        t_exp = [math.exp(v / temperature) for v in t_row]
        s_log_norm = math.log(sum(math.exp(v / temperature) for v in s_row))
        total += -sum(te / sum(t_exp) * (sv / temperature - s_log_norm) for te, sv in zip(t_exp, s_row))
    return total / len(student)


def _label_loss_by_hand(student, labels):
    rows = student.tolist()
    return sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(rows, labels.tolist())) / len(rows)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distillation_matches_hand_formula(temperature):
    g = torch.Generator().manual_seed(10)
    student, teacher = torch.randn(4, 5, generator=g) * 3, torch.randn(4, 5, generator=g) * 3
    got = losses.distillation_loss(student, teacher, temperature)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert float(got) == pytest.approx(_distill_by_hand(student, teacher, temperature), rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_mixes_label_loss(alpha):
    g = torch.Generator().manual_seed(11)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.randint(0, 4, (6,), generator=g)
    expected = alpha * _distill_by_hand(student, teacher, 2.0) + (1 - alpha) * _label_loss_by_hand(student, labels)
    got = losses.distillation_loss(student, teacher, 2.0, labels=labels, alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_distillation_gradients_reach_student_only():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    losses.distillation_loss(student, teacher, 1.5).backward()
    assert teacher.grad is None
    # d/ds of soft cross-entropy at temperature T: (softmax(s/T) - softmax(t/T)) / (T * B).
    expected = (torch.softmax(student.detach() / 1.5, 1) - torch.softmax(teacher.detach() / 1.5, 1)) / (1.5 * 3)
    assert torch.allclose(student.grad, expected, atol=1e-6)


def test_distillation_float32_under_autocast():
    layer = torch.nn.Linear(8, 5)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student, teacher = layer(x), layer(x * 2)
        loss = losses.distillation_loss(student, teacher, 1.0)
    assert student.dtype == torch.bfloat16 and loss.dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 0.5}, "labels is None"),
    ({"alpha": 1.5, "labels": torch.zeros(3, dtype=torch.long)}, r"alpha must be a number in \[0, 1\]"),
    ({"alpha": -0.1, "labels": torch.zeros(3, dtype=torch.long)}, r"alpha must be a number in \[0, 1\]"),
    ({"temperature": 0.0}, "temperature"),
    ({"labels": torch.zeros(3), "alpha": 0.5}, "integer"),
    ({"labels": torch.zeros(4, dtype=torch.long), "alpha": 0.5}, "one entry per row"),
    ({"labels": torch.zeros(3, 1, dtype=torch.long), "alpha": 0.5}, r"\(B,\)"),
])
def test_distillation_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.distillation_loss(torch.randn(3, 4), torch.randn(3, 4), **kwargs)


@pytest.mark.parametrize("student, teacher, match", [
    (torch.randn(3, 4), torch.randn(3, 5), "same shape"),
    (torch.randn(4), torch.randn(4), r"shape \(B, C\)"),
    (torch.ones(3, 4, dtype=torch.int32), torch.randn(3, 4), "floating-point"),
    (torch.randn(0, 4), torch.randn(0, 4), "B >= 1"),
])
def test_distillation_bad_logits(student, teacher, match):
    with pytest.raises(ValueError, match=match):
        losses.distillation_loss(student, teacher)


# ----------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, batch_norm, expected", [
    ("resnet18", False, 11_689_512), ("resnet34", False, 21_797_672), ("resnet50", False, 25_557_032),
    ("vgg11", False, 132_863_336), ("vgg11", True, 132_868_840),
    ("vgg16", False, 138_357_544), ("vgg16", True, 138_365_992),
])
def test_parameter_counts_match_torchvision(name, batch_norm, expected):
    # Shapes alone decide the count, so the model is built on the meta device (no memory, no init).
    with torch.device("meta"):
        model = getattr(models, name)(**({"batch_norm": True} if batch_norm else {}))
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_output_shapes_every_model(name):
    features = models.create_model(name, num_classes=0, width=0.25).eval()
    classifier = models.create_model(name, num_classes=10, width=0.25).eval()
    bottleneck = name in ("resnet50", "resnet101", "resnet152")
    assert features.feature_dim == classifier.feature_dim == 128 * (4 if bottleneck else 1)
    with torch.no_grad():
        for size in (32, 224):
            x = torch.rand(1, 3, size, size)  # one image: eval-mode BN needs no batch statistics
            assert features(x).shape == (1, features.feature_dim)
            assert classifier(x).shape == (1, 10)


def test_feature_mode_returns_the_classifier_input():
    torch.manual_seed(0)
    for name in ("resnet18", "vgg11_bn"):
        full = models.create_model(name, num_classes=7, width=0.25).eval()
        feats = models.create_model(name, num_classes=0, width=0.25).eval()
        result = feats.load_state_dict(full.state_dict(), strict=False)
        assert result.missing_keys == []
        assert result.unexpected_keys and all(k.startswith(("fc.", "classifier.")) for k in result.unexpected_keys)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            h = feats(x)
            if name.startswith("resnet"):
                assert torch.allclose(full.fc(h), full(x), atol=1e-6)
            else:
                # 32x32 leaves a 1x1 map; the 7x7 pool replicates it, so flattening repeats h 49 times.
                assert torch.allclose(full.classifier(h.repeat_interleave(49, dim=1)), full(x), atol=1e-6)


@pytest.mark.parametrize("width, stem, feature_dim", [
    (0.25, 16, 512), (0.5, 32, 1024), (1, 64, 2048), (2, 128, 4096), (4, 256, 8192), (0.001, 1, 4),
])
def test_width_multiplier(width, stem, feature_dim):
    with torch.device("meta"):
        model = models.resnet50(num_classes=0, width=width)
    assert model.conv1.out_channels == stem
    assert model.feature_dim == feature_dim
    assert model.layer4[-1].conv3.out_channels == feature_dim


def test_cifar_stem_keeps_resolution():
    seen = {}
    cifar = models.resnet18(num_classes=0, width=0.25, cifar_stem=True).eval()
    imagenet = models.resnet18(num_classes=0, width=0.25).eval()
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    assert [k for k, _ in cifar.state_dict().items()] == [k for k, _ in imagenet.state_dict().items()]
    for tag, model in (("cifar", cifar), ("imagenet", imagenet)):
        model.layer1.register_forward_hook(lambda m, i, o, tag=tag: seen.__setitem__(tag, o.shape[-1]))
        with torch.no_grad():
            assert model(torch.rand(2, 3, 32, 32)).shape == (2, 128)
    assert seen == {"cifar": 32, "imagenet": 8}


@torch.no_grad()
def test_initialisation_follows_torchvision():
    torch.manual_seed(0)
    resnet = models.resnet18(num_classes=10)
    conv = resnet.layer4[1].conv2  # 512 x 512 x 3 x 3
    fan_out = conv.out_channels * 9
    assert float(conv.weight.std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    assert torch.all(resnet.layer1[0].bn2.weight == 1) and torch.all(resnet.layer1[0].bn2.bias == 0)
    vgg = models.vgg11(num_classes=10, width=0.25)
    assert float(vgg.classifier[3].weight.std()) == pytest.approx(0.01, rel=0.02)
    assert torch.all(vgg.features[0].bias == 0)


@pytest.mark.parametrize("call, match", [
    (lambda: models.create_model("resnet17"), "resnet18, resnet34"),
    (lambda: models.create_model("vgg16bn"), "vgg16_bn"),
    (lambda: models.resnet18(width=0), "width"),
    (lambda: models.resnet18(width=-1), "width"),
    (lambda: models.vgg11(width="2"), "width"),
    (lambda: models.resnet18(num_classes=-1), "num_classes"),
])
def test_model_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("x, match", [
    (torch.rand(3, 32, 32), "single image"),
    (torch.rand(2, 1, 32, 32), r"\(B, 3, H, W\)"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating-point"),
])
def test_model_bad_images(x, match):
    for model in (models.resnet18(num_classes=0, width=0.25), models.vgg11(num_classes=0, width=0.25)):
        with pytest.raises(ValueError, match=match):
            model(x)


# ----------------------------------------------------------------------------------------------
# torchvision compatibility (skipped where torchvision is not installed)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_state_dict_layout_matches_torchvision(name):
    tvm = pytest.importorskip("torchvision.models")
    with torch.device("meta"):
        ours = models.create_model(name, num_classes=1000)
        theirs = getattr(tvm, name)(weights=None)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11_bn"])
def test_outputs_match_torchvision(name):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    theirs = getattr(tvm, name)(weights=None).eval()
    ours = models.create_model(name, num_classes=1000).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_cifar_stem_matches_modified_torchvision_resnet():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    theirs = tvm.resnet18(weights=None, num_classes=10)
    theirs.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    theirs.maxpool = torch.nn.Identity()
    ours = models.resnet18(num_classes=10, cifar_stem=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Projection head and SimCLRModel
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_projection_head_dims_and_layers(num_layers):
    torch.manual_seed(0)
    head = models.ProjectionHead(12, 20, 6, num_layers=num_layers)
    assert head.dims == [12] + [20] * (num_layers - 1) + [6]
    h = torch.randn(8, 12)
    assert torch.equal(head.features(h, 0), h)
    for k in range(1, num_layers + 1):
        assert head.features(h, k).shape == (8, head.dims[k])
    assert torch.equal(head(h), head.features(h, num_layers))
    # Middle layers: Linear (no bias), BN with scale and shift, ReLU.
    for k in range(1, num_layers):
        assert (head.features(h, k) >= 0).all()
    # The last layer's BN has a learnable scale but no shift.
    names = {n for n, _ in head.named_parameters()}
    last = f"layers.{num_layers - 1}"
    assert f"{last}.scale" in names and f"{last}.bn.weight" not in names and f"{last}.bn.bias" not in names
    assert not any(n.endswith("linear.bias") for n in names)


def test_projection_head_computes_linear_batchnorm_relu():
    torch.manual_seed(0)
    head = models.ProjectionHead(5, 7, 3, num_layers=2).train()
    with torch.no_grad():
        head.layers[0].bn.weight.uniform_(0.5, 2)
        head.layers[0].bn.bias.uniform_(-1, 1)
        head.layers[1].scale.uniform_(0.5, 2)
    h = torch.randn(10, 5)

    def batch_norm(y):
        return (y - y.mean(0)) / torch.sqrt(y.var(0, unbiased=False) + 1e-5)

    first = torch.relu(batch_norm(h @ head.layers[0].linear.weight.T) * head.layers[0].bn.weight
                       + head.layers[0].bn.bias)
    z = batch_norm(first @ head.layers[1].linear.weight.T) * head.layers[1].scale
    assert torch.allclose(head.features(h, 1), first, atol=1e-5)
    assert torch.allclose(head(h), z, atol=1e-5)
    head(h).sum().backward()
    assert head.layers[1].scale.grad is not None


@pytest.mark.parametrize("call, match", [
    (lambda: models.ProjectionHead(8, 8, 4, num_layers=0), "num_layers"),
    (lambda: models.ProjectionHead(0, 8), "in_dim"),
    (lambda: models.ProjectionHead(8, 8).features(torch.randn(2, 8), 3), r"0\.\.2"),
    (lambda: models.ProjectionHead(8, 8).features(torch.randn(2, 8), -1), r"0\.\.2"),
    (lambda: models.ProjectionHead(8, 8)(torch.randn(2, 9)), r"\(B, 8\)"),
    (lambda: models.ProjectionHead(8, 8)(torch.randn(8)), r"\(B, 8\)"),
])
def test_projection_head_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_simclr_model_returns_h_and_z():
    encoder = models.resnet18(num_classes=0, width=0.25, cifar_stem=True)
    head = models.ProjectionHead(encoder.feature_dim, 64, 16, num_layers=3)
    model = models.SimCLRModel(encoder, head)
    h, z = model(torch.rand(4, 3, 32, 32))
    assert h.shape == (4, 128) and z.shape == (4, 16)
    with pytest.raises(ValueError, match="num_classes=0"):
        models.SimCLRModel(torch.nn.Conv2d(3, 4, 3), head)(torch.rand(2, 3, 8, 8))
