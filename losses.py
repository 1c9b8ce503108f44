"""Losses for SimCLR pretraining and SimCLR v2 distillation (standard library and torch only).

Holds:
  nt_xent            the NT-Xent contrastive loss of SimCLR v1 (Chen et al. 2020, arXiv 2002.05709,
                     eq. 1 with the mean over all 2N views of Algorithm 1) on one process.
  nt_xent_global     the same loss for torch.distributed training: every rank's views are contrasted
                     with the projections of the whole global batch, as the official code does.
  distillation_loss  the SimCLR v2 distillation objective (Chen et al. 2020, arXiv 2006.10029,
                     eq. 2, optionally mixed with the label loss as in eq. 3).
  alignment, uniformity, contrastive_top1
                     not losses but what to watch them do: how close two views of one image lie, how
                     evenly images spread over the sphere (Wang & Isola 2020, arXiv 2005.10242), and
                     how often the contrastive task is solved (the positive is the nearest view).

All of them compute in float32 (float64 inputs stay float64) even inside torch.autocast, because
the softmax over thousands of cosine similarities divided by a small temperature loses too
much precision in float16/bfloat16. The input checks are at the bottom of the file.

The file imports nothing from its project, so it can be copied alone next to an installed torch.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["nt_xent", "nt_xent_global", "distillation_loss", "alignment", "uniformity", "contrastive_top1"]


# ----------------------------------------------------------------------------------------------
# NT-Xent (SimCLR v1 eq. 1)
# ----------------------------------------------------------------------------------------------

def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *,
            check_finite: bool = True) -> torch.Tensor:
    """NT-Xent loss of SimCLR v1 (eq. 1), averaged over all 2N views (Algorithm 1).

    z1, z2: (N, D) projections (any float dtype, need not be normalised); z1[i] and z2[i] are
    two views of image i. With u = normalise([z1; z2]) and s_ik = u_i . u_k, returns the scalar

        L = 1/(2N) sum_i -log( exp(s_i,p(i) / T) / sum_{k != i} exp(s_ik / T) ),

    p(i) being i's other view, in float32 (float64 stays). Each view's similarity with itself
    is masked out: it is always the largest logit (1/T) and says nothing about the other view,
    so each denominator holds 1 positive and 2N-2 negatives (N = 1 gives exactly 0). The
    official TensorFlow code reports twice this value. check_finite raises on NaN/inf
    projections but reads a value back from the device: training loops pass False.
    """
    temperature = _check_nt_xent_inputs(z1, z2, temperature, check_finite)
    dtype = _compute_dtype(torch.promote_types(z1.dtype, z2.dtype))
    with _autocast_off(z1.device):
        u = _unit_rows(torch.cat([z1, z2]).to(dtype))
        return _nt_xent_from_unit(u, u, 0, temperature)


def _nt_xent_from_unit(anchors: torch.Tensor, keys: torch.Tensor, offset: int,
                       temperature: float) -> torch.Tensor:
    """NT-Xent of 2n anchor views against K >= 2n key views (the one implementation of eq. 1).

    anchors: (2n, D) unit rows ordered [view 1 of images 0..n-1, view 2 of images 0..n-1].
    keys:    (K, D) unit rows that hold these same 2n views, in the same order, at rows
             offset .. offset+2n-1; the other K-2n rows are further negatives.
    Returns the mean over the 2n anchors of -log softmax(similarity / T)[positive], where the
    softmax runs over every key except the anchor itself.
    """
    two_n = anchors.shape[0]
    n = two_n // 2
    # Dividing the (2n, D) anchors instead of the (2n, K) product saves one K-sized pass and copy.
    logits = (anchors / temperature) @ keys.T
    # Self-similarity (1/T, the largest possible logit) is no candidate: -inf makes its exp exactly 0.
    # In place is safe for autograd, since the matrix product's backward needs only its inputs.
    logits.diagonal(offset=offset).fill_(float("-inf"))
    # Row i's positive is its other view: column i + n for a first view, i - n for a second.
    rows = torch.arange(two_n, device=anchors.device)
    targets = offset + (rows + n) % two_n
    return F.cross_entropy(logits, targets)


def _unit_rows(z: torch.Tensor) -> torch.Tensor:
    """L2-normalise each row of z (in its own dtype).

    Rows are first divided by their largest absolute entry, a factor the result does not depend
    on, so that the sum of squares neither overflows (|z| above ~1e19 in float32) nor underflows
    (|z| below ~1e-23), either of which would silently change the loss. The factor is detached:
    the normalised vector is scale invariant, so its exact gradient is unaffected. An all-zero
    row has no direction and stays zero (similarity 0 to every view).
    """
    scale = z.detach().abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    return F.normalize(z / scale, dim=1)


def nt_xent_global(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *,
                   check_finite: bool = True, group: object = None) -> torch.Tensor:
    """NT-Xent with the whole global batch as keys, for torch.distributed data parallel training.

    z1, z2: this rank's (n, D) projections, the same n and D on every rank (drop_last batches).
    The local 2n views are the anchors and the 2N = 2nR views of all R ranks the keys, so each
    denominator has the 2N-1 terms of nt_xent on the global batch, and the mean over ranks of
    the returned loss equals that nt_xent. Gradients reach each rank's projections from every
    rank's loss (_GatherWithGrad), so with DDP's averaging a step equals the single-process
    step on the global batch; every rank must call backward. Without an initialised process
    group, or with world size 1, this is nt_xent. `group`: a process group (default: world).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return nt_xent(z1, z2, temperature, check_finite=check_finite)
    temperature = _check_nt_xent_inputs(z1, z2, temperature, check_finite)
    dtype = _compute_dtype(torch.promote_types(z1.dtype, z2.dtype))
    with _autocast_off(z1.device):
        u = _unit_rows(torch.cat([z1, z2]).to(dtype))
        # Keys are rank-major blocks [z1_r; z2_r]; the loss does not depend on the key order.
        keys = _GatherWithGrad.apply(u, group).flatten(0, 1)
        offset = dist.get_rank(group) * u.shape[0]
        return _nt_xent_from_unit(u, keys, offset, temperature)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own rows from every rank.

    Forward: (m, D) on each of R ranks -> (R, m, D), the same tensor on every rank.
    Backward: rank r's loss depends on rank q's rows through the gathered copy, so the gradient
    for q's rows is the sum over ranks of the incoming gradients, slice q: all_reduce(SUM),
    then slice. Each rank then holds d(sum_r loss_r)/dz_q = R * d(mean_r loss_r)/dz_q, and
    DistributedDataParallel's division by R when it averages parameter gradients makes the
    step exactly that of one process minimising the mean loss over the global batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: object) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # all_reduce works in place; autograd may still own the incoming buffer.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None


# ----------------------------------------------------------------------------------------------
# Distillation (SimCLR v2 eq. 2-3)
# ----------------------------------------------------------------------------------------------

def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0, labels: torch.Tensor | None = None,
                      alpha: float = 1.0) -> torch.Tensor:
    """SimCLR v2 distillation loss (eq. 2), optionally mixed with the label loss (eq. 3).

    student_logits, teacher_logits: (B, C) for the same images (the teacher's are detached);
    labels: optional (B,) class indices, negative (-1) where an image's label is hidden; alpha in [0, 1],
    1.0 without labels. Returns the scalar

        alpha * mean_x [ -sum_y P_T(y|x; tau) log P_S(y|x; tau) ]
          + (1 - alpha) * mean_{x labeled} [ -log P_S(y_x|x) ]     (label term at temperature 1)

    with P(y|x; tau) = softmax(logits / tau), in float32 (float64 stays). Like the paper, no
    tau^2 factor. Eq. 3 sums the label term over the labeled images only, so it is averaged over
    the rows with a label and is 0 for a batch without any (found without waiting for the device).
    Labels >= C are left to cross_entropy.
    """
    temperature, alpha = _check_distillation_inputs(student_logits, teacher_logits, temperature, labels, alpha)
    dtype = _compute_dtype(torch.promote_types(student_logits.dtype, teacher_logits.dtype))
    with _autocast_off(student_logits.device):
        student = student_logits.to(dtype)
        teacher = teacher_logits.detach().to(dtype)
        soft_targets = F.softmax(teacher / temperature, dim=1)
        distill = -(soft_targets * F.log_softmax(student / temperature, dim=1)).sum(dim=1).mean()
        if labels is None or alpha == 1.0:
            return alpha * distill
        labels = labels.long()
        known = labels >= 0
        label_loss = F.cross_entropy(student, labels.clamp(min=0), reduction="none")
        label_loss = (label_loss * known).sum() / known.sum().clamp(min=1)
        return alpha * distill + (1.0 - alpha) * label_loss


# ----------------------------------------------------------------------------------------------
# Diagnostics of a representation (Wang & Isola 2020, arXiv 2005.10242)
#
# Each takes features as they come (h or z, any scale) and returns a 0-dim float32 tensor on their
# device, so that a caller reads all of them from the device at once.
# ----------------------------------------------------------------------------------------------

def alignment(x1: torch.Tensor, x2: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Wang & Isola's alignment: mean over i of ||u1_i - u2_i||^alpha, u = x / ||x|| (alpha = 2: the
    squared distance). x1, x2: (N, D), x1[i] and x2[i] two views of image i. 0 when every pair of
    views maps to one direction, 4 (alpha 2) when every pair points opposite ways; lower is better."""
    _check_feature_pair(x1, x2)
    alpha = _check_positive_number(alpha, "alpha")
    with _autocast_off(x1.device):
        u1, u2 = _unit_rows(x1.to(_compute_dtype(x1.dtype))), _unit_rows(x2.to(_compute_dtype(x2.dtype)))
        return (u1 - u2).norm(dim=1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola's uniformity: log of the mean over pairs i < j of exp(-t ||u_i - u_j||^2),
    u = x / ||x||. x: (N, D), N >= 2 distinct images. 0, the worst, when every image has one
    direction; lower (more negative) is more evenly spread: many images spread evenly over a sphere
    of many dimensions, where most pairs lie about sqrt(2) apart, give about -2t."""
    _check_features(x, "x")
    if x.shape[0] < 2:
        raise ValueError(f"uniformity needs N >= 2 images (it averages over pairs), got shape {tuple(x.shape)}")
    t = _check_positive_number(t, "t")
    with _autocast_off(x.device):
        u = _unit_rows(x.to(_compute_dtype(x.dtype)))
        # pdist subtracts the rows themselves: two equal rows are exactly 0 apart, which a Gram matrix
        # (2 - 2 u.v) only is up to rounding.
        return torch.pdist(u, p=2).pow(2).mul(-t).exp().mean().log()


def contrastive_top1(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of the contrastive task itself: the fraction of the 2N views (x1 and x2, (N, D),
    x1[i] and x2[i] two views of image i) whose other view is more similar (cosine) than each of the
    2N - 2 views of the other images. A tie with a negative counts as a miss, so one repeated
    feature for every image scores 0 (N = 1 scores 1: nothing competes). (B, N, D) inputs hold B
    separate batches of N images, each its own task; the mean is over all 2BN views. Chance is
    about 1 / (2N - 1), and N matters: a larger batch is a harder task."""
    for name, x in (("x1", x1), ("x2", x2)):
        if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3):
            raise ValueError(f"{name} must be a (N, D) or (B, N, D) tensor of features, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must have the same shape: x1[..., i, :] and x2[..., i, :] are two views of "
                         f"image i; got {tuple(x1.shape)} and {tuple(x2.shape)}")
    _check_feature_pair(x1.flatten(0, -2), x2.flatten(0, -2))
    with _autocast_off(x1.device):
        views = torch.cat([x1, x2], dim=-2)
        u = _unit_rows(views.flatten(0, -2).to(_compute_dtype(views.dtype))).view(views.shape)
        sim = u @ u.transpose(-2, -1)
        n = x1.shape[-2]
        rows = torch.arange(2 * n, device=sim.device)
        positive = (rows + n) % (2 * n)
        positive_sim = sim[..., rows, positive]
        # A view is no candidate for itself; nor is its positive a negative.
        sim[..., rows, rows] = float("-inf")
        sim[..., rows, positive] = float("-inf")
        return (positive_sim > sim.amax(dim=-1)).float().mean()


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 go up to float32; float64 stays (gradient checks need it).
    return torch.promote_types(dtype, torch.float32)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    # Under autocast the matrix product would run in float16/bfloat16; casting the inputs alone
    # is not enough because autocast re-casts them at the op.
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


# ----------------------------------------------------------------------------------------------
# Input checks (shapes, dtypes and Python scalars only; only check_finite waits for the device)
# ----------------------------------------------------------------------------------------------

def _check_nt_xent_inputs(z1: object, z2: object, temperature: object, check_finite: bool) -> float:
    """Checks nt_xent's arguments; returns the temperature as a float."""
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (N, D), got {type(z).__name__}")
        if z.ndim != 2:
            raise ValueError(
                f"{name} must have shape (N, D) (a batch of N projections of dimension D), "
                f"got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")
    if z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same shape (N, D): z1[i] and z2[i] are two views of image i; "
            f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] == 0 or z1.shape[1] == 0:
        raise ValueError(f"z1 and z2 need N >= 1 images and D >= 1 dimensions, got shape {tuple(z1.shape)}")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 must be on the same device, got {z1.device} and {z2.device}")
    temperature = _check_positive_number(temperature, "temperature")
    if check_finite:
        # bool() of a device tensor waits for the device; that is why callers can switch this off.
        for name, z in (("z1", z1), ("z2", z2)):
            if not bool(torch.isfinite(z).all()):
                raise ValueError(
                    f"{name} contains NaN or infinite values; expected finite projections "
                    f"(the encoder or head has probably diverged)")
    return temperature


def _check_distillation_inputs(student_logits: object, teacher_logits: object, temperature: object,
                               labels: object, alpha: object) -> tuple[float, float]:
    """Checks distillation_loss's arguments; returns (temperature, alpha) as floats."""
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (B, C), got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must have shape (B, C), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape (B, C), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.shape[0] == 0 or student_logits.shape[1] == 0:
        raise ValueError(f"logits need B >= 1 rows and C >= 1 classes, got {tuple(student_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}")
    temperature = _check_positive_number(temperature, "temperature")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    alpha = float(alpha)
    if labels is None:
        if alpha != 1.0:
            raise ValueError(
                f"alpha={alpha} weights a label loss, but labels is None; pass labels or alpha=1.0")
    else:
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
            raise ValueError(
                f"labels must be a (B,) tensor of class indices, got "
                f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype in (torch.bool, torch.uint8):
            raise ValueError(f"labels must be a signed integer tensor of class indices (-1: hidden), got dtype "
                             f"{labels.dtype}")
        if labels.shape[0] != student_logits.shape[0]:
            raise ValueError(
                f"labels must have one entry per row of the logits ({student_logits.shape[0]}), "
                f"got {labels.shape[0]}")
        if labels.device != student_logits.device:
            raise ValueError(
                f"labels must be on the logits' device {student_logits.device}, got {labels.device}")
    return temperature, alpha


def _check_features(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, D) with N >= 1 images and D >= 1 dimensions, "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_feature_pair(x1: object, x2: object) -> None:
    """Two (N, D) views of the same N images on one device."""
    _check_features(x1, "x1")
    _check_features(x2, "x2")
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must have the same shape (N, D): x1[i] and x2[i] are two views of image i; "
                         f"got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if x1.device != x2.device:
        raise ValueError(f"x1 and x2 must be on the same device, got {x1.device} and {x2.device}")


def _check_positive_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)
