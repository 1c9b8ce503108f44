"""SimCLR on one page: pretrain a small ResNet without labels, then score its features by kNN.

Top to bottom, from the four files a learner copies (augment, losses, models, optim) and the
embedded world's images (shapes.py): two random views of every image, one forward pass of both,
NT-Xent, LARS with SimCLR's parameter groups, a learning rate set every step. `python
simclr_one_page.py` runs it; `simclr.py pretrain` is the same step with options and checkpoints.
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
POOL_IMAGES, EPOCHS, BATCH = 8192, 10, 256
WIDTH, HEAD_LAYERS, TEMPERATURE = 0.125, 3, 0.5
BASE_LR, WEIGHT_DECAY, WARMUP_EPOCHS = 2.0, 1e-4, 1
STRENGTH, CROP_MIN_SCALE = 1.0, 0.4  # strong colour and large crops: this world's colours and layouts are shortcuts
KNN_BANK, KNN_QUERIES, KNN_K, SEED = 2000, 500, 50, 0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def knn_top1(encoder: torch.nn.Module, bank: torch.Tensor, bank_labels: torch.Tensor,
             queries: torch.Tensor, query_labels: torch.Tensor, classes: int) -> float:
    """Weighted kNN (Wu et al. 2018): the K most cosine-similar bank images vote, weight exp(sim / 0.1)."""
    encoder.eval()  # batch norm's running statistics: the features must not depend on the batch
    features = lambda x: F.normalize(torch.cat([encoder(b.float() / 255) for b in x.split(512)]), dim=1)
    sim, idx = (features(queries) @ features(bank).T).topk(KNN_K, dim=1)
    votes = torch.zeros(len(queries), classes, device=DEVICE).scatter_add_(1, bank_labels[idx], (sim / 0.1).exp())
    encoder.train()
    return (votes.argmax(1) == query_labels).float().mean().item()


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) uint8 on the device: images travel as bytes, augment makes floats."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(DEVICE)


def main(steps: int | None = None) -> float:
    """Pretrain for EPOCHS (or `steps`) steps of SimCLR, print the loss as it goes, return kNN top-1."""
    torch.manual_seed(SEED)
    pool = as_tensor(generate("shapes-pool", POOL_IMAGES, seed=SEED)[0])  # no labels: SimCLR never sees one
    bank, bank_labels, classes = generate("shapes5", KNN_BANK, "train", seed=SEED)
    queries, query_labels, _ = generate("shapes5", KNN_QUERIES, "test", seed=SEED)

    encoder = models.create_model("resnet18", num_classes=0, width=WIDTH, cifar_stem=True)  # h = f(x)
    head = models.ProjectionHead(encoder.feature_dim, encoder.feature_dim, 128, HEAD_LAYERS)  # z = g(h)
    model = models.SimCLRModel(encoder, head).to(DEVICE)
    # Biases and batch-norm parameters get no weight decay and no trust ratio (see optim.LARS).
    opt = optim.LARS(optim.parameter_groups(model, WEIGHT_DECAY), lr=0.0, weight_decay=WEIGHT_DECAY)
    views = augment.SimCLRAugment(32, strength=STRENGTH, scale=(CROP_MIN_SCALE, 1.0))
    per_epoch = POOL_IMAGES // BATCH  # drop the last partial batch: NT-Xent's difficulty depends on the batch
    total = steps or EPOCHS * per_epoch
    peak = optim.scaled_lr(BASE_LR, BATCH)  # linear scaling: base lr x batch / 256

    start = time.time()
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(POOL_IMAGES, device=DEVICE)
        x = pool[order[(step % per_epoch) * BATCH:][:BATCH]]
        for group in opt.param_groups:  # warm-up then cosine, set every step, not every epoch
            group["lr"] = optim.learning_rate(step, total, WARMUP_EPOCHS * per_epoch, peak)
        # Both views in one batch of 2B: one forward pass, and batch norm's statistics cover both
        # views, as SimCLR's global batch norm covers every device's share of the batch.
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

    labels = lambda y: torch.as_tensor(y, device=DEVICE)  # noqa: E731
    top1 = knn_top1(encoder, as_tensor(bank), labels(bank_labels), as_tensor(queries), labels(query_labels), len(classes))
    print(f"kNN top-1, shapes5 test: {top1:.3f} (chance {1 / len(classes):.3f}); {time.time() - start:.0f} s")
    return top1


if __name__ == "__main__":
    main()
