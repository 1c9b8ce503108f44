"""Tests for run_all.py: the tiny preset end to end, resume after an interrupted stage, the verdict rule."""

import json
import math

import pytest
from PIL import Image

import distill
import run_all
import simclr


# --- the verdict rule, on hand-made numbers --------------------------------------------------------


def test_verdict_holds_when_gap_exceeds_spread():
    # gap 0.10, standard deviations 0.01: the ordering holds by far more than the spread.
    assert run_all.verdict([0.90, 0.91, 0.92], [0.80, 0.81, 0.82]) == "holds"


def test_verdict_fails_when_the_opposite_ordering_holds():
    assert run_all.verdict([0.80, 0.81, 0.82], [0.90, 0.91, 0.92]) == "fails"


def test_verdict_not_conclusive_when_gap_within_spread():
    # mean gap 0.01 but a standard deviation of 0.05 on one side.
    assert run_all.verdict([0.80, 0.85, 0.90], [0.83, 0.84, 0.85]) == "not conclusive"
    assert run_all.verdict([0.83, 0.84, 0.85], [0.80, 0.85, 0.90]) == "not conclusive"


def test_verdict_one_seed_is_never_conclusive():
    assert run_all.verdict([0.99], [0.01]) == "not conclusive"
    assert run_all.verdict([0.01], [0.99]) == "not conclusive"


def test_verdict_spread_is_the_larger_standard_deviation():
    # gap 0.02; std 0.01 on the left, 0.03 on the right: not conclusive (0.02 < 0.03); with both
    # sides at std 0.01 it holds.
    assert run_all.verdict([0.51, 0.52, 0.53], [0.47, 0.50, 0.53]) == "not conclusive"
    assert run_all.verdict([0.51, 0.52, 0.53], [0.49, 0.50, 0.51]) == "holds"


def test_combine_needs_every_ordering():
    assert run_all.combine(["holds", "holds"]) == "holds"
    assert run_all.combine(["holds", "not conclusive"]) == "not conclusive"
    assert run_all.combine(["holds", "fails", "not conclusive"]) == "fails"


def test_mean_std_is_the_sample_standard_deviation():
    m, s = run_all.mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    assert run_all.mean_std([0.5]) == (0.5, 0.0)


# --- options ---------------------------------------------------------------------------------------


def test_parse_data_maps_studies_and_study2_follows_study1():
    defaults = dict(pool="shapes-pool", study1="shapes5", study3=["shapes2", "shapes5"])
    m = run_all.parse_data("study1=/data/flowers,study3=a:b:c", defaults)
    assert m == dict(pool="shapes-pool", study1="/data/flowers", study2="/data/flowers", study3=["a", "b", "c"])
    assert run_all.parse_data("study2=x", defaults)["study2"] == "x"
    for bad in ("study4=x", "study1", "study1=", "study1=a,study1=b"):
        with pytest.raises(run_all.UserError):
            run_all.parse_data(bad, defaults)


# --- the tiny preset end to end, then resume ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_all") / "tiny"
    assert run_all.main(["--preset", "tiny", "--device", "cpu", "--out", str(out)]) == 0
    return out


def _numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_tiny_writes_all_three_studies_tables_and_figures(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    assert set(results["table1"]) == {k for k, _, _ in run_all.STUDY1_ROWS}
    assert set(results["table2"]) == {f"{m}-{f}" for m, f in run_all.STUDY2_ROWS}
    assert results["study3_tasks"] == ["shapes2", "shapes5", "shapes47", "shapes100"]
    assert results["batch_sizes"] == [32, 64]
    for table in ("table1", "table2", "table4"):
        values = list(_numbers(results[table]))
        assert values and all(math.isfinite(v) for v in values), table
        assert all(0.0 <= v <= 1.0 for v in values), table
    assert len(list(_numbers(results["table4"]))) == 4 * 2
    # every stage has its record and wall time; versions and device are recorded
    assert all(s["wall_s"] >= 0 for s in results["stages"].values())
    assert {"python", "torch", "numpy", "pillow"} <= set(results["versions"])
    assert results["device"]["type"] == "cpu" and results["seeds"] == [0]
    assert set(results["verdicts"]) == {"study1", "study2", "study3"}
    md = (tiny_run / "results.md").read_text()
    for needle in ("Study 1", "Study 2", "Study 3", "0.898", "0.71", "0.906", "not conclusive"):
        assert needle in md
    for name in ("figure2.png", "figure6.png"):
        with Image.open(tiny_run / name) as im:
            im.load()
            assert im.size[0] >= 600 and im.size[1] >= 400
            assert len(set(im.convert("RGB").getdata())) > 10  # something was drawn


def test_existing_run_is_refused_without_resume_or_overwrite(tiny_run, capsys):
    assert run_all.main(["--preset", "tiny", "--device", "cpu", "--out", str(tiny_run)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(tiny_run, capsys):
    assert run_all.main(["--preset", "tiny", "--device", "cpu", "--out", str(tiny_run), "--resume", "--seed", "5"]) == 2
    assert "seeds" in capsys.readouterr().err


def test_resume_reruns_only_the_stage_without_a_record(tiny_run, monkeypatch):
    before = json.loads((tiny_run / "results.json").read_text())
    lost = "seed0-study2-frozen-vgg"
    (tiny_run / "stages" / f"{lost}.json").unlink()
    calls = []

    def counting(fn, label):
        def wrapper(*args, **kwargs):
            calls.append(label)
            return fn(*args, **kwargs)
        return wrapper

    import transfer
    monkeypatch.setattr(simclr, "pretrain", counting(simclr.pretrain, "pretrain"))
    monkeypatch.setattr(simclr, "finetune", counting(simclr.finetune, "finetune"))
    monkeypatch.setattr(distill, "distill", counting(distill.distill, "distill"))
    monkeypatch.setattr(transfer, "transfer", counting(transfer.transfer, "transfer"))
    assert run_all.main(["--preset", "tiny", "--device", "cpu", "--out", str(tiny_run), "--resume"]) == 0
    assert calls == ["distill"]
    after = json.loads((tiny_run / "results.json").read_text())
    assert [k for k, s in after["stages"].items() if not s["reused"]] == [lost]
    record = json.loads((tiny_run / "stages" / f"{lost}.json").read_text())
    assert record["resumed"] is True  # its own run folder held a checkpoint: continued, not restarted
    assert after["table1"] == before["table1"] and after["table4"] == before["table4"]
    assert after["table2"][f"frozen-vgg"]["student"] == pytest.approx(before["table2"]["frozen-vgg"]["student"])
