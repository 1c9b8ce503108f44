import json
import math
import os
import signal
import socket

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import simclr


def tiny_pretrain_config(**overrides) -> simclr.PretrainConfig:
    """A pretraining run of a few seconds on CPU: a narrow ResNet-18 on 16-pixel images."""
    cfg = dict(data="shapes-pool", eval_data="shapes5", image_size=16, n_images=256, model="resnet18", width=0.125,
               head_layers=2, epochs=2, batch_size=64, knn_every=1, knn_k=20, log_every=1, device="cpu", seed=0)
    cfg.update(overrides)
    return simclr.PretrainConfig(**cfg)


# --- optimisation ---------------------------------------------------------------------------------


def test_lars_matches_hand_computed_update():
    # w = (3, 4): |w| = 5; g = (0.6, 0.8): |g| = 1; wd = 0.1 -> g' = (0.9, 1.2), |g'| = 1.5;
    # trust = 0.001 * 5 / 1.5 = 1/300; v = lr * trust * g' = (0.003, 0.004); w <- (2.997, 3.996).
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = simclr.LARS([dict(params=[w]), dict(params=[b], weight_decay=0.0, lars=False)], lr=1.0, momentum=0.9,
                      weight_decay=0.1, trust_coefficient=0.001)
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    b.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([2.997, 3.996], dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.tensor([0.5], dtype=torch.float64))  # plain SGD, no decay
    # Second step, same gradient: momentum carries the first velocity.
    w_before = w.detach().clone()
    g2 = torch.tensor([0.6, 0.8], dtype=torch.float64) + 0.1 * w_before
    trust2 = 0.001 * w_before.norm() / g2.norm()
    v2 = 0.9 * torch.tensor([0.003, 0.004], dtype=torch.float64) + trust2 * g2
    opt.step()
    torch.testing.assert_close(w.detach(), w_before - v2)


def test_lars_zero_weight_uses_unit_trust():
    w = nn.Parameter(torch.zeros(2))
    opt = simclr.LARS([w], lr=0.5, momentum=0.0, weight_decay=0.0)
    w.grad = torch.tensor([1.0, -2.0])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.5, 1.0]))


def test_parameter_groups_exclude_bn_and_bias():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = simclr.parameter_groups(m, 1e-4)
    assert {id(p) for p in decay["params"]} == {id(m[0].weight), id(m[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(m[0].bias), id(m[1].weight), id(m[1].bias), id(m[3].bias)}
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars"] is False


def test_learning_rate_warmup_then_cosine_per_step():
    lrs = [simclr.learning_rate(s, 100, 10, 2.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[9] == pytest.approx(2.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))               # rises every step of warm-up
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))                # then falls every step
    assert lrs[55] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert simclr.scaled_lr(1.0, 512) == 2.0 and simclr.scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)


# --- checkpoints and run folders -----------------------------------------------------------------


def test_atomic_save_crash_between_write_and_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    simclr.atomic_save({"kind": "test", "v": torch.tensor([1.0])}, path)

    def crash(src, dst):
        raise OSError("simulated crash before rename")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        simclr.atomic_save({"kind": "test", "v": torch.tensor([2.0])}, path)
    monkeypatch.undo()
    assert simclr.load_checkpoint(path)["v"].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left behind


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "c.pt"
    simclr.atomic_save({"kind": "pretrain", "x": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(data.UserError, match="could not be read"):
        simclr.load_checkpoint(path)


def test_run_folder_refuses_existing_run(tmp_path):
    run = simclr.RunFolder(tmp_path / "r")
    run.write_config({"a": 1})
    with pytest.raises(data.UserError, match="already holds a run"):
        simclr.RunFolder(tmp_path / "r")
    simclr.RunFolder(tmp_path / "r", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(data.UserError, match="is a file"):
        simclr.RunFolder(tmp_path / "file" / "run")


def test_select_device_errors():
    assert simclr.select_device("cpu").type == "cpu"
    with pytest.raises(data.UserError, match="Unknown device"):
        simclr.select_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(data.UserError, match="no usable CUDA"):
            simclr.select_device("cuda")


# --- pretraining ----------------------------------------------------------------------------------


def read_log(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]


def test_pretrain_lowers_loss_and_beats_random_encoder(tmp_path):
    summary = simclr.pretrain(tiny_pretrain_config(epochs=8, n_images=512, knn_every=8), tmp_path / "run")
    steps = [r for r in read_log(tmp_path / "run") if "loss" in r]
    first, last = np.mean([r["loss"] for r in steps[:4]]), np.mean([r["loss"] for r in steps[-4:]])
    assert last < first - 0.1, (first, last)
    # A seeded run of this size gives a clear gap between the pretrained and a random encoder on the
    # 5-class val split; chance is 0.2.
    assert summary["knn_top1"] > summary["knn_top1_random_encoder"] + 0.05, summary
    ckpt = simclr.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["kind"] == "pretrain" and ckpt["step"] == len(steps)


def test_resume_after_sigint_equals_uninterrupted_run(tmp_path, monkeypatch):
    cfg = tiny_pretrain_config(eval_data=None, n_images=128, batch_size=32, epochs=2)
    simclr.pretrain(cfg, tmp_path / "straight")
    reference = simclr.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")

    original = simclr.contrastive_loss_fn
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        inner = original(*args, **kwargs)

        def loss_fn(x, y, g):
            calls["n"] += 1
            if calls["n"] == 5:  # mid-epoch (4 steps per epoch): step 5 is the first of epoch 2
                os.kill(os.getpid(), signal.SIGINT)
            return inner(x, y, g)
        return loss_fn
    monkeypatch.setattr(simclr, "contrastive_loss_fn", interrupting)
    with pytest.raises(data.UserError, match="--resume"):
        simclr.pretrain(cfg, tmp_path / "resumed")
    monkeypatch.undo()
    assert simclr.load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 5
    simclr.pretrain(cfg, tmp_path / "resumed", resume=True)
    resumed = simclr.load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert resumed["step"] == reference["step"]
    for k, v in reference["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=0, msg=k)
    losses_straight = [r["loss"] for r in read_log(tmp_path / "straight") if "loss" in r]
    losses_resumed = [r["loss"] for r in read_log(tmp_path / "resumed") if "loss" in r]
    assert losses_resumed == losses_straight


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path, monkeypatch):
    original = simclr.contrastive_loss_fn
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        inner = original(*args, **kwargs)

        def loss_fn(x, y, g):
            calls["n"] += 1
            loss = inner(x, y, g)
            return loss * float("nan") if calls["n"] == 7 else loss
        return loss_fn
    monkeypatch.setattr(simclr, "contrastive_loss_fn", poisoned)
    cfg = tiny_pretrain_config(eval_data=None, n_images=128, batch_size=32, epochs=3, log_every=3)
    with pytest.raises(simclr.NonFiniteLoss, match=r"at step 7 .*checkpoint\.pt"):
        simclr.pretrain(cfg, tmp_path / "run")
    # The epoch-1 checkpoint (step 4) survives; nothing after the bad step was saved.
    assert simclr.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 4


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    code = simclr.main(["pretrain", "--out", str(tmp_path / "r"), "--temperature", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--temperature must be positive" in err and "Traceback" not in err
    code = simclr.main(["linear-eval", "--checkpoint", str(tmp_path / "missing.pt")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_linear_eval_and_finetune_from_pretrained(tmp_path):
    simclr.pretrain(tiny_pretrain_config(eval_data=None, epochs=1), tmp_path / "pre")
    ckpt = tmp_path / "pre" / "checkpoint.pt"
    res = simclr.linear_eval(ckpt, "shapes5", tmp_path / "lin", epochs=20, device="cpu")
    assert 0.0 <= res["test"]["top1"] <= 1.0 and set(res["test"]["per_class"]) == set(res["val"]["per_class"])
    ft = simclr.finetune(ckpt, "shapes5", tmp_path / "ft", fraction=0.5, head_layer=1, epochs=1, batch_size=32,
                         device="cpu")
    teacher, meta = simclr.load_classifier(ft["best"], num_classes=5)
    assert meta["kind"] == "finetune" and teacher.head_layer == 1
    with pytest.raises(data.UserError, match="predicts 5 classes"):
        simclr.load_classifier(ft["best"], num_classes=2)


def test_check_frozen_catches_a_changed_bn_statistic():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    m(torch.randn(2, 3, 8, 8))  # training-mode forward updates running statistics
    with pytest.raises(RuntimeError, match="running_mean"):
        simclr.check_frozen(before, m)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, dump: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    original = simclr.fit

    def fit_and_dump(model, *args, **kwargs):
        history = original(model, *args, **kwargs)
        torch.save(simclr.unwrap(model).state_dict(), os.path.join(dump, f"rank{rank}.pt"))
        return history
    simclr.fit = fit_and_dump
    simclr.pretrain(tiny_pretrain_config(eval_data=None, n_images=256, batch_size=64, epochs=3), out)
    torch.distributed.destroy_process_group()


def test_two_process_gloo_pretraining_keeps_ranks_identical(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in r0:
        if "running" in k or "num_batches" in k:
            continue  # plain BN on CPU: each rank keeps statistics of its own shard
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=k)
    steps = [r["loss"] for r in read_log(tmp_path / "run") if "loss" in r]
    assert np.mean(steps[-2:]) < np.mean(steps[:2]), steps


# --- faults in a real command-line run (slow) -------------------------------------------------------

import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_CLI = ["pretrain", "--data", "shapes-pool", "--n-images", "128", "--image-size", "16", "--width", "0.125",
            "--batch-size", "32", "--epochs", "3", "--log-every", "1", "--checkpoint-every", "1", "--eval-data", "",
            "--device", "cpu"]


def _cli(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "simclr.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for_step(run_dir, step, proc, timeout=120):
    log = os.path.join(run_dir, "log.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(log) and any(json.loads(l).get("step", 0) >= step for l in open(log) if l.strip()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {log}")


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [3, 8])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, kill_after):
    straight = _cli([*TINY_CLI, "--out", str(tmp_path / "straight")])
    assert straight.wait(timeout=300) == 0, straight.communicate()
    proc = _cli([*TINY_CLI, "--out", str(tmp_path / "killed")])
    _wait_for_step(tmp_path / "killed", kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = simclr.load_checkpoint(tmp_path / "killed" / "checkpoint.pt")  # never unreadable
    assert kill_after - 1 <= ckpt["step"] <= kill_after + 2
    resumed = _cli([*TINY_CLI, "--out", str(tmp_path / "killed"), "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = simclr.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = simclr.load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_sigterm_save_and_say_how_to_resume(tmp_path, sig):
    proc = _cli([*TINY_CLI, "--epochs", "50", "--out", str(tmp_path / "run")])
    _wait_for_step(tmp_path / "run", 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "--resume" in err and "Traceback" not in err
    assert simclr.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] >= 2
