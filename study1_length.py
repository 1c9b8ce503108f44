"""Study 1 against fine-tuning length: does augmentation pay off once fine-tuning lasts long enough?

The seed paper's Study 1 (their Table 1) finds that fine-tuning with crop, flip and colour
distortion ('all') beats fine-tuning without augmentation ('none'). Augmentation fights
overfitting, and a short fine-tune may end before the network overfits, so the ordering can
depend on the length. This command fine-tunes the rows 'all', 'flip' and 'none' of Study 1 at
several lengths, each for every seed, on the preset's Study 1 task with its other settings (the
encoder, the task, learning rate, batch), and reports:

    the table and figure_length.png    test top-1 of the best-val epoch against epochs, one line per row
    a verdict per ordering and length  run_all's rule: the gap must exceed the spread over seeds
    the length the rule below picks    fixed before any run, never by which length makes a claim hold

Length rule: the shortest length at which the median over seeds of the 'none' row's best
validation epoch is at most LENGTH_RULE (0.8) of the length: the row without augmentation has had
time to overfit (its validation accuracy peaked and did not improve over the last fifth).

Command line:
    python study1_length.py --preset cifar --root DIR --epochs 15,30,60 --out runs/study1-length
    python study1_length.py --preset tiny --epochs 1,2 --out /tmp/length     # seconds (the tests)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import checkpoints
import data
import options
import report
import run_all
import train
from options import UserError

ROWS = ("all", "flip", "none")  # Study 1's rows whose orderings the length may change
ORDERINGS = (("all", "none"), ("flip", "none"), ("all", "flip"))  # (higher, lower) as the paper found them
LENGTH_RULE = 0.8  # 'none' has overfit when its median best epoch is at most this share of the length
OUTPUTS = ("stages", "results.json", "results.md", "figure_length.png")


def best_epoch(folder: Path) -> int:
    """The epoch whose validation top-1 chose best.pt: the first best, as train.fit keeps it."""
    records = [r for r in run_all._read_log(folder) if "val_top1" in r]
    return max(records, key=lambda r: (r["val_top1"], -r["epoch"]))["epoch"]


def length_stage(finetune: Callable[[Path, bool], dict]) -> Callable[[Path, bool], dict]:
    """run_all's fine-tuning stage, with the best validation epoch its log records."""
    def run(folder: Path, resume: bool) -> dict:
        return dict(finetune(folder, resume), best_epoch=best_epoch(folder))
    return run


def chosen_length(best_epochs: dict[int, list[int]]) -> int | None:
    """The length rule: the shortest length whose 'none' row's median best epoch is at most
    LENGTH_RULE of it; None when no length meets it."""
    return next((n for n in sorted(best_epochs) if statistics.median(best_epochs[n]) <= LENGTH_RULE * n), None)


def summarise(runs: dict, lengths: Sequence[int], seeds: Sequence[int]) -> dict:
    """Per-seed numbers -> test top-1 and best epochs per row and length, a verdict per ordering and
    length, and the length the rule picks."""
    per = lambda key: {row: {n: [runs[f"seed{s}-e{n}-{row}"][key] for s in seeds]  # noqa: E731
                             for n in lengths} for row in ROWS}
    test, best = per("test_top1"), per("best_epoch")
    verdicts = {n: {f"{hi} beats {lo}": report.judge([(test[hi][n], test[lo][n])], len(seeds))
                    for hi, lo in ORDERINGS} for n in lengths}
    return dict(lengths=list(lengths), test_top1=test, best_epoch=best, verdicts=verdicts,
                chosen_length=chosen_length(best["none"]))


def results_markdown(summary: dict, task: data.TaskData, meta: dict) -> str:
    """The table, the verdicts, what the verdict rule can resolve, and the length rule's choice."""
    lengths, test, n_test = summary["lengths"], summary["test_top1"], len(task.test)
    lines = [f"# Study 1 against fine-tuning length ({meta['preset']} preset)", "",
             f"Device: {meta['device']}, precision {meta['precision']}. Seeds: {meta['seeds']}. Wall time: "
             f"{meta['wall_s']:.0f} s. Command: `{meta['command']}`.", "",
             f"Whole network fine-tuned from the encoder ({meta['encoder']}) on {report.display_name(task.name)} "
             f"({task.num_classes} classes, {len(task.train)} / {len(task.val)} / {n_test} train / val / test); test "
             "top-1 of the best-val epoch, mean ± std over seeds; in brackets the median best validation epoch.", "",
             "| row | " + " | ".join(map(_epochs, lengths)) + " |", "|---" * (1 + len(lengths)) + "|"]
    for row in ROWS:
        cells = [f"{report.mean_std_text(test[row][n])} ({statistics.median(summary['best_epoch'][row][n]):g})"
                 for n in lengths]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "| ordering | " + " | ".join(map(_epochs, lengths)) + " |", "|---" * (1 + len(lengths)) + "|"]
    for hi, lo in ORDERINGS:
        claim = f"{hi} beats {lo}"
        lines.append(f"| {claim} | " + " | ".join(_verdict_cell(summary["verdicts"][n][claim]["text"], test[hi][n],
                                                               test[lo][n]) for n in lengths) + " |")
    accuracy = statistics.fmean(v for row in ROWS for n in lengths for v in test[row][n])
    noise = math.sqrt(accuracy * (1 - accuracy) / n_test)
    chosen = summary["chosen_length"]
    lines += ["", "- What the verdict rule can resolve: an ordering holds (or fails) when the gap between the two "
              "rows' means exceeds the larger of their standard deviations over seeds (beside each verdict). That "
              "spread is of the fine-tuning alone: every seed is tested on the same "
              f"{n_test} images, whose own sampling error (about {noise:.3f} for one accuracy near {accuracy:.3f}, "
              f"{noise * math.sqrt(2):.3f} for a gap) the rule does not see, so a verdict on a gap below about "
              f"{noise * math.sqrt(2):.3f} says more about these {n_test} images than about the rows.",
              f"- Length rule (fixed before the runs): the shortest length at which the median over seeds of the "
              f"'none' row's best validation epoch is at most {LENGTH_RULE:g} of the length: "
              + (f"**{chosen} epochs**." if chosen else "**no length here meets it**."), ""]
    return "\n".join(lines)


def _verdict_cell(text: str, higher: Sequence[float], lower: Sequence[float]) -> str:
    """A verdict with the gap it judged and the spread the gap had to exceed."""
    (mh, sh), (ml, sl) = report.mean_std(higher), report.mean_std(lower)
    return f"{text} (gap {mh - ml:+.3f}, spread {max(sh, sl):.3f})"


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def draw_length(path: Path, summary: dict, n_seeds: int) -> None:
    """figure_length.png: test top-1 against fine-tuning epochs, one line per row, error bars = std over seeds."""
    stats = {row: [report.mean_std(summary["test_top1"][row][n]) for n in summary["lengths"]] for row in ROWS}
    colours = dict(zip(ROWS, report.HERE_COLOURS))
    report.draw_chart(path, f"Study 1 against fine-tuning length (mean ± std, {n_seeds} seeds)",
                      "fine-tuning epochs", [str(n) for n in summary["lengths"]],
                      [(row, colours[row], [m for m, _ in stats[row]], [s for _, s in stats[row]]) for row in ROWS],
                      kind="line")


def parse_lengths(text: str) -> list[int]:
    """'15,30,60' -> [15, 30, 60]: distinct positive whole numbers, in increasing order."""
    try:
        lengths = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1 or len(set(lengths)) != len(lengths):
        raise UserError(f"--epochs '{text}': expected distinct positive whole numbers separated by commas, "
                        "e.g. 15,30,60.")
    return sorted(lengths)


@dataclasses.dataclass
class LengthConfig(run_all.RunAllConfig):
    """run_all's options (the preset gives the task, the encoder and every other setting) and the lengths."""
    epochs: str = options.option("15,30,60", "fine-tuning lengths in epochs, comma-separated")


def study1_length(cfg: LengthConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                  command: str = "") -> dict:
    """Rows 'all', 'flip' and 'none' fine-tuned for each length and seed -> results.json, results.md and
    figure_length.png in `out`; --resume skips finished fine-tunes (run_all's Pipeline)."""
    start, out, lengths = time.perf_counter(), Path(out), parse_lengths(cfg.epochs)
    plan = run_all.plan_run(cfg)
    plan.values["knn_check"] = False  # the encoder's kNN check says nothing about fine-tuning length
    settings = dict(plan.settings(), lengths=lengths)
    folder = run_all.prepare_folder(out, settings, resume, overwrite, outputs=OUTPUTS)
    train.seed_everything(cfg.seed)
    name = plan.mapping["study1"]
    task = run_all.load_tasks([name], plan.values["image_size"], plan.values["tasks"], cfg.seed, cfg.root,
                              cfg.cache_dir, plan.download, cfg.skip_bad)[name]
    images = len(plan.seeds) * len(ROWS) * sum(lengths) * len(task.train)
    compiled = train.resolve_compile(cfg.compile, plan.rt.device, images)
    finetune = dataclasses.replace(plan.values["finetune"], compile="on" if compiled else "off")
    augmentations = {key: aug for key, _, aug in report.STUDY1_ROWS}
    with run_all.Pipeline(out, resume, 1 + len(lengths) * len(plan.seeds) * len(ROWS)) as pipe:
        encoder = run_all.encoder_stage(pipe, plan)
        for n in lengths:
            for s in plan.seeds:
                for row in ROWS:
                    stage = run_all.finetune_stage(encoder, task, augmentations[row],
                                                   dataclasses.replace(finetune, epochs=n), s, plan.device)
                    pipe.run(f"seed{s}-e{n}-{row}", length_stage(stage))
    summary = summarise(pipe.results, lengths, plan.seeds)
    meta = dict(preset=plan.preset, seeds=plan.seeds, device=report.device_info(plan.rt.device)["name"],
                precision=plan.rt.precision, encoder=run_all._encoder_origin(plan.teacher), task=name,
                wall_s=time.perf_counter() - start, command=command or f"study1_length(epochs={cfg.epochs!r})")
    results = dict(meta, settings=settings, runs=pipe.results, **summary)
    checkpoints.atomic_write_text(json.dumps(results, indent=2, default=str) + "\n", out / "results.json")
    markdown = results_markdown(summary, task, meta)
    checkpoints.atomic_write_text(markdown, out / "results.md")
    draw_length(out / "figure_length.png", summary, len(plan.seeds))
    print(markdown)
    folder.close()
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=run_all.RawHelpFormatter)
    options.add_options(p, LengthConfig)
    options.add_run(p, required=False, default="runs/study1_length", resumes_from="its last finished fine-tune")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return train.main(argv, run=lambda args: run_all.run_study(study1_length, LengthConfig, args, argv,
                                                                "study1_length.py"), parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
