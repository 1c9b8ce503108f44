"""Encoders and the projection head of SimCLR (standard library and torch only).

Holds:
  resnet18 .. resnet152  ResNet (He et al. 2016) in torchvision's layout and initialisation (the
                         "v1.5" variant: stride on the 3x3 conv of a bottleneck), plus SimCLR's
                         width multiplier (1x, 2x, 4x; fractions such as 0.25 for CPU-sized
                         runs) and its CIFAR stem (SimCLR v1 appendix B.9: 3x3 stride-1 first
                         conv, no max-pool).
  vgg11 .. vgg19         VGG (Simonyan & Zisserman 2015, configurations A, B, D, E) in
                         torchvision's layout, with or without batch norm.
  ProjectionHead         the head g of SimCLR v1 section 2.1 (z = g(h) = W2 ReLU(W1 h)) in the
                         SimCLR v2 form (section 2.2): every layer linear + batch norm, ReLU on all
                         but the last, any depth (v1: 2 layers, v2: 3), and the output after any
                         layer for fine-tuning from the middle of the head.
  SimCLRModel            encoder f and head g together: h = f(x), z = g(h) (SimCLR v1 sec. 2.1).
  Classifier             every labeled network: encoder, optionally the head cut at layer k
                         (SimCLR v2 sec. 2.2), optional dense layers, a linear layer; the base can
                         be frozen (the seed paper's students).
  MODEL_NAMES, create_model  the encoders by name.

With their default arguments the ResNet and VGG constructors have exactly torchvision's
parameter and buffer names and shapes and compute the same function, so a torchvision state_dict
(or a SimCLR checkpoint converted to that layout) loads with strict=True and gives the same
outputs. With num_classes=0 a model has no classifier and returns its globally average-pooled
features (B, model.feature_dim); loading a full torchvision state_dict into it then needs
strict=False, which reports the classifier's keys (fc.* or classifier.*) as unexpected and
nothing as missing.

The file imports nothing from its project, so it can be copied alone next to an installed torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "BasicBlock", "Bottleneck", "ResNet", "VGG",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "vgg11", "vgg13", "vgg16", "vgg19",
    "ProjectionHead", "SimCLRModel", "Classifier", "MODEL_NAMES", "create_model",
]


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------

def _check_width(width: object) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a positive number (1 = standard, 2 or 4 = SimCLR's wide "
                         f"models, 0.25 or 0.5 = narrow), got {width!r}")
    return float(width)


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0 (0 = no classifier, return "
                         f"pooled features), got {num_classes!r}")
    return num_classes


def _scaled(channels: int, width: float) -> int:
    """Channel count times the width multiplier, rounded, never below one channel."""
    return max(1, int(round(channels * width)))


def _check_images(x: object) -> None:
    # Shape and dtype only: reading values would wait for the device.
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a tensor of images (B, 3, H, W), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a batch of RGB images with shape (B, 3, H, W), got shape "
                         f"{tuple(x.shape)}" + (" (a single image? add a batch dimension with "
                                                "x.unsqueeze(0))" if x.ndim == 3 else ""))
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point images, got dtype {x.dtype} "
                         f"(convert uint8 images with x.float() / 255 and normalise them first)")


# ----------------------------------------------------------------------------------------------
# ResNet
# ----------------------------------------------------------------------------------------------

def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def _projection_shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN where the residual changes shape (named downsample.0 / downsample.1)."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34). (B, in_ch, H, W) -> (B, planes, H/s, W/s)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _projection_shortcut(in_ch, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, residual (ResNet-50/101/152).

    (B, in_ch, H, W) -> (B, 4 * planes, H/s, W/s).
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection_shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet encoder/classifier. forward: (B, 3, H, W) float -> (B, num_classes) logits, or
    (B, feature_dim) pooled features when num_classes == 0.

    Stages have 64, 128, 256, 512 base channels (times `width`, times 4 for bottlenecks); the
    stem is 64 * width channels. Default stem: 7x7 stride-2 conv and 3x3 stride-2 max-pool
    (ImageNet, overall stride 32); cifar_stem: 3x3 stride-1 conv and no max-pool (overall stride
    8), with `maxpool` kept as an Identity so parameter names do not change.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks_per_stage: tuple[int, ...],
                 num_classes: int = 1000, width: float = 1.0, cifar_stem: bool = False) -> None:
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        width = _check_width(width)
        stem_ch = _scaled(64, width)
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, stem_ch, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, stem_ch, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_ch = stem_ch
        stages = []
        for base, count, stride in zip((64, 128, 256, 512), blocks_per_stage, (1, 2, 2, 2)):
            planes = _scaled(base, width)
            stage = []
            for i in range(count):
                stage.append(block(in_ch, planes, stride if i == 0 else 1))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim: int = in_ch
        self.fc = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()

        # torchvision's initialisation; the classifier keeps nn.Linear's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, width: float = 1, cifar_stem: bool = False) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2); 11,689,512 parameters at the defaults."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, width, cifar_stem)


def resnet34(num_classes: int = 1000, width: float = 1, cifar_stem: bool = False) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3); 21,797,672 parameters at the defaults."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, width, cifar_stem)


def resnet50(num_classes: int = 1000, width: float = 1, cifar_stem: bool = False) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3); 25,557,032 parameters at the defaults."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, width, cifar_stem)


def resnet101(num_classes: int = 1000, width: float = 1, cifar_stem: bool = False) -> ResNet:
    """ResNet-101 (Bottleneck, 3-4-23-3)."""
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, width, cifar_stem)


def resnet152(num_classes: int = 1000, width: float = 1, cifar_stem: bool = False) -> ResNet:
    """ResNet-152 (Bottleneck, 3-8-36-3)."""
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes, width, cifar_stem)


# ----------------------------------------------------------------------------------------------
# VGG
# ----------------------------------------------------------------------------------------------

# Output channels of each 3x3 conv; "M" is a 2x2 stride-2 max-pool.
_VGG_LAYOUTS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG encoder/classifier. forward: (B, 3, H, W) float, H and W >= 32 -> (B, num_classes)
    logits, or (B, feature_dim) features when num_classes == 0.

    With num_classes > 0: `features`, `avgpool` (adaptive, to 7x7) and `classifier`
    (Linear(feature_dim*49, 4096)-ReLU-Dropout(0.5)-Linear(4096, 4096)-ReLU-Dropout(0.5)-
    Linear(4096, num_classes)) as torchvision; the 4096 hidden units do not scale with `width`.
    With num_classes == 0 there is no classifier module: the last conv block is average-pooled
    over all positions (the 7x7 pool would only replicate a 1x1 map of a 32x32 input), giving
    feature_dim = 512 * width values per image.
    """

    def __init__(self, layout: tuple[int | str, ...], num_classes: int = 1000,
                 batch_norm: bool = False, width: float = 1.0) -> None:
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        width = _check_width(width)
        layers: list[nn.Module] = []
        in_ch = 3
        for v in layout:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_ch = _scaled(int(v), width)
            layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.feature_dim: int = in_ch
        if num_classes > 0:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier: nn.Sequential | None = nn.Sequential(
                nn.Linear(in_ch * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(p=0.5),
                nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(p=0.5),
                nn.Linear(4096, num_classes),
            )
        else:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.classifier = None

        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return x if self.classifier is None else self.classifier(x)


def vgg11(num_classes: int = 1000, batch_norm: bool = False, width: float = 1) -> VGG:
    """VGG-11 (configuration A); 132,863,336 parameters (132,868,840 with batch norm) at the defaults."""
    return VGG(_VGG_LAYOUTS["vgg11"], num_classes, batch_norm, width)


def vgg13(num_classes: int = 1000, batch_norm: bool = False, width: float = 1) -> VGG:
    """VGG-13 (configuration B)."""
    return VGG(_VGG_LAYOUTS["vgg13"], num_classes, batch_norm, width)


def vgg16(num_classes: int = 1000, batch_norm: bool = False, width: float = 1) -> VGG:
    """VGG-16 (configuration D); 138,357,544 parameters (138,365,992 with batch norm) at the defaults."""
    return VGG(_VGG_LAYOUTS["vgg16"], num_classes, batch_norm, width)


def vgg19(num_classes: int = 1000, batch_norm: bool = False, width: float = 1) -> VGG:
    """VGG-19 (configuration E)."""
    return VGG(_VGG_LAYOUTS["vgg19"], num_classes, batch_norm, width)


# ----------------------------------------------------------------------------------------------
# Projection head and the SimCLR model
# ----------------------------------------------------------------------------------------------

class _HeadLayer(nn.Module):
    """Linear (no bias) + batch norm, then ReLU, or for the last layer no ReLU and no BN shift.

    As SimCLR v2's code: a bias before batch norm would be cancelled by it; the middle layers'
    BN has a learnable scale and shift; the last layer's BN a learnable scale but no shift,
    stored here as `scale` next to a BN without affine parameters.
    """

    def __init__(self, in_dim: int, out_dim: int, last: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bn = nn.BatchNorm1d(out_dim, affine=not last)
        self.scale = nn.Parameter(torch.ones(out_dim)) if last else None
        self.last = last
        # SimCLR v2's initialisation; the BN right after makes the output independent of its scale.
        nn.init.normal_(self.linear.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.linear(x))
        return x * self.scale if self.last else torch.relu(x)


def _check_dim(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class ProjectionHead(nn.Module):
    """SimCLR projection head g: (B, in_dim) representations h -> (B, out_dim) projections z.

    num_layers layers of Linear(bias=False) + BatchNorm1d, with ReLU after every layer but the
    last (SimCLR v2 section 2.2; v1 is num_layers=2, v2 uses 3). Widths: dims = [in_dim,
    hidden_dim, ..., hidden_dim, out_dim]. features(h, k) returns the output after layer k
    (after its ReLU), with k = 0 meaning h itself: SimCLR v2 fine-tunes from k = 1.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128, num_layers: int = 2) -> None:
        super().__init__()
        in_dim = _check_dim(in_dim, "in_dim")
        hidden_dim = _check_dim(hidden_dim, "hidden_dim")
        out_dim = _check_dim(out_dim, "out_dim")
        num_layers = _check_dim(num_layers, "num_layers")
        self.dims: list[int] = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(
            _HeadLayer(self.dims[k], self.dims[k + 1], last=(k == num_layers - 1))
            for k in range(num_layers))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def features(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Output after layer `layer` (0 = h itself, num_layers = z): (B, dims[layer])."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer must be an integer in 0..{self.num_layers} "
                             f"(0 = the encoder output h), got {layer!r}")
        if not isinstance(h, torch.Tensor) or h.ndim != 2 or h.shape[1] != self.dims[0]:
            shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"h must have shape (B, {self.dims[0]}), got {shape}")
        for k in range(layer):
            h = self.layers[k](h)
        return h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.features(h, self.num_layers)


class SimCLRModel(nn.Module):
    """Encoder f and projection head g: forward(x) -> (h, z) with h = f(x) (B, feature_dim)
    and z = g(h) (B, out_dim). The encoder must return flat features (create it with
    num_classes=0)."""

    def __init__(self, encoder: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        if h.ndim != 2:
            raise ValueError(f"the encoder must return flat features (B, D), got shape {tuple(h.shape)}; "
                             f"create it with num_classes=0")
        return h, self.head(h)


class Classifier(nn.Module):
    """Every labeled network of the recipe: the fine-tuned model, the linear probe, the student.

    base: encoder + the first `head_layer` projection-head layers (SimCLR v2 section 2.2 fine-tunes
    from head layer 1; 0 is the encoder output), then optional `dense_layers` (Linear + ReLU; the
    seed paper's Figure 5 puts trainable dense layers on a frozen base), then the linear layer fc.
    x (B, 3, H, W) float in [0, 1] -> (x - mean) / std -> base (B, D) -> dense (B, D') -> (B, C).
    mean/std are buffers: the normalisation belongs to the weights (zeros/ones for SimCLR's own
    models, ImageNet statistics for torchvision's supervised ones), never a hidden constant.
    """

    def __init__(self, encoder: nn.Module, head: ProjectionHead | None, head_layer: int, num_classes: int,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 dense_layers: Sequence[int] = ()) -> None:
        super().__init__()
        if head_layer > 0 and head is None:
            raise ValueError("head_layer > 0 needs a projection head")
        self.encoder = encoder
        self.head = head if head_layer > 0 else None
        self.head_layer = head_layer
        in_dim = head.dims[head_layer] if head_layer > 0 else encoder.feature_dim
        layers: list[nn.Module] = []
        for width in dense_layers:
            layers += [nn.Linear(in_dim, width), nn.ReLU(inplace=True)]
            in_dim = width
        # An empty Sequential is the identity and has no state, so a plain classifier keeps its keys.
        self.dense = nn.Sequential(*layers)
        self.dense_layers = [int(w) for w in dense_layers]
        self.fc = nn.Linear(in_dim, num_classes)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.frozen_base = False

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D): what a frozen base computes (cacheable)."""
        h = self.encoder((x - self.mean) / self.std)
        return self.head.features(h, self.head_layer) if self.head is not None else h

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """Base features (B, D) -> logits (B, num_classes): the trainable part of a frozen base."""
        return self.fc(self.dense(h))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, fc.in_features): the input of the last linear layer."""
        return self.dense(self.base(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.base(x))

    def freeze_base(self) -> Classifier:
        """No gradients for the base, and its batch norm keeps its statistics even under .train():
        a training loop calls model.train() every epoch, and BN in training mode would update its
        running means although no weight has a gradient."""
        self.frozen_base = True
        for part in (self.encoder, self.head):
            if part is not None:
                part.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if getattr(self, "frozen_base", False):
            for part in (self.encoder, self.head):
                if part is not None:
                    part.eval()
        return self


# ----------------------------------------------------------------------------------------------
# By name
# ----------------------------------------------------------------------------------------------

MODEL_NAMES: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
)

_RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
            "resnet101": resnet101, "resnet152": resnet152}


def create_model(name: str, num_classes: int = 0, width: float = 1.0,
                 cifar_stem: bool = False) -> nn.Module:
    """The encoder called `name` (one of MODEL_NAMES); num_classes=0 gives a feature extractor.
    cifar_stem applies to ResNets only (VGG has no stem to change)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if name in _RESNETS:
        return _RESNETS[name](num_classes=num_classes, width=width, cifar_stem=cifar_stem)
    base, _, suffix = name.partition("_")
    return VGG(_VGG_LAYOUTS[base], num_classes=num_classes, batch_norm=suffix == "bn", width=width)
