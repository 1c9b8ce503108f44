"""SimCLR on one page: pretrain a small ResNet without labels, then score its features by kNN.

From the four files a learner copies (augment, losses, models, optim) and shapes.py's images: two
random views of every image, one forward pass of both, NT-Xent, LARS with SimCLR's parameter groups,
a learning rate set every step. `simclr.py pretrain` is the same step with options and checkpoints.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F

import augment
import losses
import models
import optim
from shapes import generate

# The released embedded-world encoder's settings (RESULTS.md), on a smaller pool and budget.
POOL_IMAGES, EPOCHS, BATCH, WIDTH, SEED = 8192, 10, 256, 0.125, 0
HEAD_LAYERS = 3      # SimCLR v2's deeper head: fine-tuning can then start from its first layer
TEMPERATURE = 0.5    # SimCLR's CIFAR-10 value (v1 B.9): lower sharpens the loss on the hardest negatives
BASE_LR, WEIGHT_DECAY, WARMUP_EPOCHS = 2.0, 1e-4, 1
STRENGTH = 1.0        # every image has random colours: weak colour jitter leaves colour a shortcut (v1 section 3)
CROP_MIN_SCALE = 0.4  # not SimCLR's 0.08: the class is an outline, and 8% of 32 px keeps only texture
KNN_BANK, KNN_QUERIES, KNN_K = 2000, 500, 50
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def knn_top1(encoder: torch.nn.Module, bank: np.ndarray, bank_labels: np.ndarray,
             queries: np.ndarray, query_labels: np.ndarray, classes: int) -> float:
    """Weighted kNN (Wu et al. 2018) on the encoder's h, not the head's z (the head discards what the task
    needs, v1 section 4.2): the K most cosine-similar bank images vote with weight exp(sim / 0.1)."""
    encoder.eval()  # batch norm's running statistics: the features must not depend on the batch
    features = lambda x: F.normalize(torch.cat([encoder(b.float() / 255) for b in as_tensor(x).split(512)]), dim=1)
    sim, idx = (features(queries) @ features(bank).T).topk(KNN_K, dim=1)
    votes = torch.zeros(len(queries), classes, device=DEVICE)
    votes.scatter_add_(1, torch.as_tensor(bank_labels, device=DEVICE)[idx], (sim / 0.1).exp())
    encoder.train()
    return (votes.argmax(1).cpu().numpy() == query_labels).mean().item()


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) uint8 on the device: images travel as bytes, augment makes floats."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(DEVICE)


def main(steps: int | None = None) -> float:
    """Pretrain EPOCHS epochs of SimCLR (or `steps` steps), print the loss once an epoch, return kNN top-1."""
    torch.manual_seed(SEED)
    pool = as_tensor(generate("shapes-pool", POOL_IMAGES, seed=SEED)[0])  # no labels: SimCLR never sees one
    bank, bank_labels, classes = generate("shapes5", KNN_BANK, "train", seed=SEED)
    queries, query_labels, _ = generate("shapes5", KNN_QUERIES, "test", seed=SEED)

    # 3x3 stem without max-pool (v1 B.9): ImageNet's stem would shrink 32 px to 8 before the first block.
    encoder = models.create_model("resnet18", num_classes=0, width=WIDTH, cifar_stem=True)  # h = f(x)
    # The loss sees z = g(h): z grows invariant to the views and loses what h keeps (v1 section 4.2).
    head = models.ProjectionHead(encoder.feature_dim, encoder.feature_dim, 128, HEAD_LAYERS)
    model = models.SimCLRModel(encoder, head).to(DEVICE)
    # LARS scales each layer's step to its weight norm, which keeps large batches stable (v1 B.1); biases
    # and batch-norm parameters get neither that nor weight decay (see optim.LARS).
    opt = optim.LARS(optim.parameter_groups(model, WEIGHT_DECAY), lr=0.0, weight_decay=WEIGHT_DECAY)
    views = augment.SimCLRAugment(32, strength=STRENGTH, scale=(CROP_MIN_SCALE, 1.0))
    per_epoch = POOL_IMAGES // BATCH  # drop the last partial batch: NT-Xent's difficulty depends on the batch
    total = EPOCHS * per_epoch if steps is None else steps
    peak = optim.scaled_lr(BASE_LR, BATCH)  # a larger batch averages more gradients, so it takes a larger step

    start = time.time()
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(POOL_IMAGES, device=DEVICE)
        x = pool[order[(step % per_epoch) * BATCH:][:BATCH]]
        for group in opt.param_groups:  # warm-up then cosine, set every step, not every epoch
            group["lr"] = optim.learning_rate(step, total, WARMUP_EPOCHS * per_epoch, peak)
        # Both views in one batch of 2B, as SimCLR's global batch norm: positives and negatives are
        # normalised with the same statistics, which then cannot give a view's partner away.
        _, z = model(torch.cat([views(x), views(x)]))
        z1, z2 = z.chunk(2)
        # Each view must pick its partner out of 2B - 1 candidates; its own similarity is masked.
        loss = losses.nt_xent(z1, z2, TEMPERATURE, check_finite=False)  # a finiteness check would wait for the device
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % per_epoch == 0 or step == total - 1:  # .item() waits for the device: once an epoch
            print(f"step {step:4d}/{total}  loss {loss.item():.4f}  lr {opt.param_groups[0]['lr']:.3f}  "
                  f"{(step + 1) * BATCH / (time.time() - start):.0f} img/s")

    top1 = knn_top1(encoder, bank, bank_labels, queries, query_labels, len(classes))
    print(f"kNN top-1, shapes5 test: {top1:.3f} (chance {1 / len(classes):.3f}); {time.time() - start:.0f} s")
    return top1


if __name__ == "__main__":
    main()
