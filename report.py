"""What run_all.py writes once its stages have run: the verdict rule, the tables beside the seed
paper's numbers (results.md), the figures, and results.json.

The seed paper's tables give each study its rows: Study 1's augmentation settings, Study 2's
students, Study 3's tasks by number of classes. run_all.py runs one stage per row and seed, named
seed{S}-study1-{row}, seed{S}-study2-{mode}-{family} and seed{S}-study3-{task}-b{batch}; `summarise`
reads their results by those names, turns them into tables (lists over seeds) and judges each of the
paper's claims by one rule (`verdict`). study1_length.py reports with the same rule and charts.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL
import torch
import tqdm as tqdm_module
from PIL import Image, ImageDraw, ImageFont

import checkpoints
import data

# ----------------------------------------------------------------------------------------------
# The seed paper's tables: the rows each study reports, and the paper's numbers

# The seed paper's own numbers (their Tables 1, 2 and 4). Study 1 rows: key, their wording, augmentations used.
# Study 2's teacher is fine-tuned as the 'all' row is.
ALL_OPERATIONS = dict(crop=True, flip=True, color=True)
STUDY1_ROWS: tuple[tuple[str, str, dict], ...] = (
    ("crop", "cropping only", dict(crop=True, flip=False, color=False)),
    ("flip", "flipping only", dict(crop=False, flip=True, color=False)),
    ("color", "color distortion only", dict(crop=False, flip=False, color=True)),
    ("crop+color", "cropping + color distortion", dict(crop=True, flip=False, color=True)),
    ("flip+crop", "flipping + cropping", dict(crop=True, flip=True, color=False)),
    ("all", "all (crop, flip, color distortion)", ALL_OPERATIONS),
    ("none", "none", dict(crop=False, flip=False, color=False)),
)
PAPER_TABLE1 = {"crop": 0.840, "flip": 0.841, "color": 0.839, "crop+color": 0.870, "flip+crop": 0.873,
                "all": 0.898, "none": 0.784}
PAPER_TABLE2 = {"vgg": 0.65, "resnet": 0.71}  # frozen base + dense layers, ResNet-50 teacher
PAPER_TABLE4 = {2: ("cats_vs_dogs", 1.0), 5: ("tf_flowers", 0.906), 47: ("dtd", 0.656), 100: ("cifar_100", 0.25),
                101: ("food_101", 0.125)}  # classes: (dataset, accuracy at batch 64)
STUDY2_ROWS = (("frozen", "resnet"), ("frozen", "vgg"), ("scratch", "resnet"), ("scratch", "vgg"))
RANDOM_TAG = "-random"  # marks Study 3's random-encoder stages: seed0-study3-TASK-random-b64


# ----------------------------------------------------------------------------------------------
# The rule that turns numbers into a verdict, and summaries over seeds


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(higher: Sequence[float], lower: Sequence[float]) -> str:
    """Does the claim 'higher > lower' hold over seeds (one value per seed on each side)?

    'holds' when mean(higher) - mean(lower) exceeds the spread over seeds (the larger of the two
    sample standard deviations); 'fails' when the opposite ordering holds by the same margin;
    otherwise 'not conclusive'. With fewer than two seeds there is no spread to compare a gap with:
    'not conclusive' whatever the gap."""
    if min(len(higher), len(lower)) < 2:
        return "not conclusive"
    (mh, sh), (ml, sl) = mean_std(higher), mean_std(lower)
    spread = max(sh, sl)
    if mh - ml > spread:
        return "holds"
    if ml - mh > spread:
        return "fails"
    return "not conclusive"


def combine(verdicts: Sequence[str]) -> str:
    """A claim made of several orderings holds when all do and fails when any fails."""
    if any(v == "fails" for v in verdicts):
        return "fails"
    return "holds" if verdicts and all(v == "holds" for v in verdicts) else "not conclusive"


def _in_mean(pairs: Sequence[tuple[Sequence[float], Sequence[float]]]) -> bool:
    return all(statistics.fmean(h) > statistics.fmean(l) for h, l in pairs)


# ----------------------------------------------------------------------------------------------
# Tables, verdicts and results.md


def mean_std_text(values: Sequence[float] | None) -> str:
    """Values over seeds as a table cell: 'mean ± std', the value alone for one seed, '-' for none."""
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.3f} ± {s:.3f}" if len(values) > 1 else f"{m:.3f}"


def _verdict_text(v: str, pairs: Sequence[tuple[Sequence[float], Sequence[float]]], n_seeds: int) -> str:
    if n_seeds < 2:
        direction = "holds" if _in_mean(pairs) else "does not hold"
        return f"**not conclusive** (one seed; the ordering {direction} in this single run)"
    return f"**{v}**"


def judge(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], n_seeds: int) -> dict:
    """A claim's verdict over seeds, whether its ordering holds in the mean, and how results.md says it."""
    v = combine([verdict(h, l) for h, l in pairs])
    return dict(verdict=v, ordering_in_mean=_in_mean(pairs), text=_verdict_text(v, pairs, n_seeds))


def summarise(runs: dict, mapping: dict, tasks: dict[str, data.TaskData], seeds: list[int],
              references: Sequence[str] = ()) -> dict:
    """Per-seed numbers -> the three tables (lists over seeds) and a verdict per claim. tasks: Study 3's;
    references: Study 3's in-domain tasks, tabled but left out of its claims."""
    n = len(seeds)
    t1 = {key: [runs[f"seed{s}-study1-{key}"]["test_top1"] for s in seeds] for key, _, _ in STUDY1_ROWS}
    singles, combos = ("crop", "flip", "color"), ("crop+color", "flip+crop")
    claims1 = {
        "all is best": [(t1["all"], t1[k]) for k, _, _ in STUDY1_ROWS if k != "all"],
        "none is worst": [(t1[k], t1["none"]) for k, _, _ in STUDY1_ROWS if k != "none"],
        "combinations beat single operations": [(t1[c], t1[s]) for c in combos for s in singles],
    }
    t2 = {}
    for mode, family in STUDY2_ROWS:
        rs = [runs[f"seed{s}-study2-{mode}-{family}"] for s in seeds]
        t2[f"{mode}-{family}"] = dict(student=[r["student_test_top1"] for r in rs],
                                      teacher=[r["teacher_test_top1"] for r in rs],
                                      agreement=[r["agreement_test"] for r in rs], arch=rs[0]["student_arch"])
    claims2 = {f"same-architecture student beats VGG ({mode} student)":
               [(t2[f"{mode}-resnet"]["student"], t2[f"{mode}-vgg"]["student"])] for mode in ("frozen", "scratch")}
    study3 = sorted(dict.fromkeys(mapping["study3"]), key=lambda t: tasks[t].num_classes)
    batch_sizes = sorted({int(k.rsplit("-b", 1)[1]) for k in runs if "-study3-" in k and RANDOM_TAG not in k})
    t4 = {t: {b: [runs[f"seed{s}-study3-{t}-b{b}"]["test_top1"] for s in seeds] for b in batch_sizes} for t in study3}
    big = max(batch_sizes)
    random = {t: [runs[k]["test_top1"] for s in seeds if (k := f"seed{s}-study3-{t}{RANDOM_TAG}-b{big}") in runs]
              for t in study3 if f"seed{seeds[0]}-study3-{t}{RANDOM_TAG}-b{big}" in runs}
    moved = [t for t in study3 if t not in references]  # the tasks the encoder is transferred to
    claims4 = {f"accuracy falls as the number of classes grows (batch {big})":
               [(t4[a][big], t4[b][big]) for a, b in zip(moved, moved[1:])]}
    if len(batch_sizes) > 1 and len(moved) > 1:
        small = min(batch_sizes)
        gain = {t: [x - y for x, y in zip(t4[t][big], t4[t][small])] for t in moved}
        claims4[f"more classes gain more from batch {big} over {small} ({display_name(moved[-1])} vs "
                f"{display_name(moved[0])})"] = \
            [(gain[moved[-1]], gain[moved[0]])]
    verdicts = {study: {name: judge(pairs, n) for name, pairs in claims.items()}
                for study, claims in (("study1", claims1), ("study2", claims2), ("study3", claims4))}
    return dict(table1=t1, table2=t2, table4={t: {str(b): v for b, v in d.items()} for t, d in t4.items()},
                table4_random=random, study3_tasks=study3, reference_tasks=[t for t in study3 if t in references],
                batch_sizes=batch_sizes, verdicts=verdicts)


def display_name(name: str) -> str:
    """A dataset as results.md names it: a folder by its own name, not its whole path."""
    return Path(name).name if os.sep in name or "/" in name else name


def _short(name: str) -> str:
    """A task as a figure labels it: a selection of more than two classes by its count."""
    base, chosen = data.split_classes(name)
    return f"{display_name(base)} ({len(chosen)} classes)" if chosen and len(chosen) > 2 else display_name(name)


def _operations(runs: dict, names: Sequence[str]) -> str:
    """The augmentations the named stages used, as their results record them (augment.describe)."""
    used = dict.fromkeys(runs[n].get("augmentation", "?") for n in names if n in runs)
    return ", ".join(f"`{u}`" for u in used) or "-"


def _pretraining_views(meta: dict) -> str:
    views = meta.get("augmentation")
    if not views:
        return ("The encoder records no pretraining augmentation, so the stages use pretraining's defaults for "
                f"{meta['image_size']} px images.")
    return (f"Crop and colour take the encoder's pretraining settings: crops from {views['crop_min_scale']:.0%} "
            f"to 100% of the image, colour strength {views['strength']:g} (the seed paper's premise for Study 1).")


def results_markdown(summary: dict, meta: dict, tasks: dict[str, data.TaskData], tasks3: dict[str, data.TaskData],
                     mapping: dict, runs: dict) -> str:
    """results.md: how the run was made, then each study's table beside the paper's numbers, with its verdicts.
    tasks: Studies 1 and 2's; tasks3: Study 3's (sized on their own where the preset says so)."""
    lines = [*_overview(meta, mapping), *_study1_section(summary, meta, tasks[mapping["study1"]], runs),
             *_study2_section(summary, meta, tasks[mapping["study2"]], runs),
             *_study3_section(summary, meta, tasks3, runs),
             "", "Figures: figure2.png (Study 1), figure6.png (Study 3). Every number: results.json.", ""]
    return "\n".join(lines)


def _claims(summary: dict, study: str) -> list[str]:
    """A study's verdicts, one line per claim."""
    return [f"- Claim '{c}': {v['text']}." for c, v in summary["verdicts"][study].items()]


def _overview(meta: dict, mapping: dict) -> list[str]:
    """The title, where and how the run ran, the verdict rule and the encoder the studies start from."""
    n = len(meta["seeds"])
    spread = f"mean ± std over {n} seeds" if n > 1 else "one seed"
    lines = [f"# The seed paper's three studies, reproduced ({meta['preset']} preset)", "",
             f"Device: {meta['device']['name']}, precision {meta['precision']}. Seeds: {meta['seeds']} ({spread}). "
             "Wall time: "
             f"{meta['wall_s']:.0f} s. Command: `{meta['command']}`.", "",
             "Verdict rule: a claim *holds* when its ordering holds in the mean over seeds and every gap exceeds "
             "the spread over seeds (the larger sample standard deviation of the two sides); it *fails* when the "
             "opposite ordering holds by the same rule; otherwise, and always with one seed, it is *not conclusive*. "
             "Seeds vary fine-tuning, distillation and probe training; the pretrained encoders are shared, so "
             "the spread does not cover pretraining seeds.", "",
             f"Encoder: {meta['encoders']['teacher']}."]
    pre = meta.get("pretrain") or {}
    if pre.get("knn_top1") is not None:
        lines += [f"Pretraining check: kNN top-1 on {display_name(pre.get('task') or mapping['study1'])} val "
                  f"{pre['knn_top1']:.3f} with "
                  f"this encoder vs {pre['knn_top1_random_encoder']:.3f} with a random one."]
    return [*lines, ""]


def _study1_section(summary: dict, meta: dict, task: data.TaskData, runs: dict) -> list[str]:
    """Table 1: test top-1 per augmentation setting of the fine-tuning, beside the paper's."""
    lines = ["## Study 1: augmentation during fine-tuning (their Table 1, Figure 2)", "",
             f"Whole network fine-tuned from the pretrained checkpoint on {display_name(task.name)} "
             f"({task.num_classes} classes, "
             f"{len(task.train)} training labels, chance {1 / task.num_classes:.3f}); test top-1 of the best-val epoch. "
             + _pretraining_views(meta) + " Operations of the 'all' row: "
             + _operations(runs, [f"seed{s}-study1-all" for s in meta["seeds"]]) + ".", "",
             "| operations used while fine-tuning | paper (tf_flowers) | here |", "|---|---|---|"]
    lines += [f"| {label} | {PAPER_TABLE1[key]:.3f} | {mean_std_text(summary['table1'][key])} |"
              for key, label, _ in STUDY1_ROWS]
    singles = [statistics.fmean(summary["table1"][k]) for k in ("crop", "flip", "color")]
    return [*lines, "", *_claims(summary, "study1"),
            f"- 'Each single operation helps about equally': here the three single-operation rows span "
            f"{max(singles) - min(singles):.3f} (paper: 0.002).", ""]


def _study2_section(summary: dict, meta: dict, task: data.TaskData, runs: dict) -> list[str]:
    """Table 2: each student's test top-1 and agreement with the teacher, beside the paper's."""
    lines = ["## Study 2: teacher and student architecture in distillation (their Table 2)", "",
             f"Teacher: {meta['teacher']}. Soft labels only (alpha = 1, temperature 1), distilled on "
             f"{display_name(task.name)}'s training "
             f"images with their labels hidden; test top-1 of the best-val epoch (chance {1 / task.num_classes:.3f}). "
             f"Frozen: a SimCLR-pretrained base of the student's architecture (ResNet: {meta['encoders']['resnet']}; "
             f"VGG: {meta['encoders']['vgg']}; the ResNet base from another seed than the teacher's encoder) with "
             "trainable dense layers, as the paper. Scratch: the whole "
             "student trained from random initialisation (extra rows). Student views: frozen "
             + _operations(runs, [n for n in runs if "-study2-frozen-" in n]) + ", scratch "
             + _operations(runs, [n for n in runs if "-study2-scratch-" in n]) + ".", "",
             "| student | teacher | mode | paper | student | teacher | agreement |", "|---|---|---|---|---|---|---|"]
    for mode, family in STUDY2_ROWS:
        r = summary["table2"][f"{mode}-{family}"]
        paper = f"{PAPER_TABLE2[family]:.2f}" if mode == "frozen" else "-"
        lines.append(f"| {r['arch']} | {meta['teacher_arch']} | {mode} | {paper} | {mean_std_text(r['student'])} | "
                     f"{mean_std_text(r['teacher'])} | {mean_std_text(r['agreement'])} |")
    return [*lines, "", *_claims(summary, "study2"), ""]


def _study3_section(summary: dict, meta: dict, tasks: dict[str, data.TaskData], runs: dict) -> list[str]:
    """Table 4: the linear probe's test top-1 per task and batch size, beside the paper's at batch 64."""
    bs, random = summary["batch_sizes"], summary["table4_random"]
    lines = ["## Study 3: transfer to tasks with different numbers of classes (their Table 4, Figure 6)", "",
             "A linear layer on the frozen pretrained encoder, random crop + flip "
             f"({_operations(runs, [n for n in runs if '-study3-' in n])}), lr "
             f"{meta['probe']['lr']}, no weight decay, {meta['probe']['epochs']} epochs for every batch size; "
             "test top-1 of the best-val epoch.", "",
             "| dataset | classes | train / val / test | image size | chance | paper dataset | paper (batch 64) | "
             + " | ".join(f"here (batch {b})" for b in bs)
             + (f" | random encoder (batch {max(bs)})" if random else "") + " |",
             "|---" * (7 + len(bs) + bool(random)) + "|"]
    for name in summary["study3_tasks"]:
        task, reference = tasks[name], name in summary["reference_tasks"]
        paper = None if reference else PAPER_TABLE4.get(task.num_classes)
        lines.append(f"| {display_name(name)}{' (in-domain reference)' if reference else ''} | {task.num_classes} | "
                     f"{len(task.train)} / {len(task.val)} / {len(task.test)} | "
                     f"{meta['image_size']} | {1 / task.num_classes:.3f} | "
                     f"{paper[0] if paper else '-'} | {f'{paper[1]:.3f}' if paper else '-'} | "
                     + " | ".join(mean_std_text(summary["table4"][name][str(b)]) for b in bs)
                     + (f" | {mean_std_text(random.get(name))}" if random else "") + " |")
    lines += ["", *_claims(summary, "study3")]
    if random:
        gains = [f"{display_name(t)} {statistics.fmean(summary['table4'][t][str(max(bs))]) - statistics.fmean(v):+.3f}"
                 for t, v in random.items()]
        lines += [f"- What pretraining adds (pretrained minus random encoder, batch {max(bs)}): {', '.join(gains)}. "
                  "The random encoder: one untrained network of the same architecture (batch norm at its initial "
                  f"statistics), probed with seed {meta['seeds'][0]}."]
    if summary["reference_tasks"]:
        lines += [f"- {', '.join(display_name(t) for t in summary['reference_tasks'])}: from the dataset the encoder was "
                  "pretrained on (without labels): an in-domain reference, not transfer to a new dataset; left out "
                  "of the verdicts."]
    return lines


# ----------------------------------------------------------------------------------------------
# Figures with Pillow: a bar chart (Figure 2) and accuracy against number of classes (Figure 6)

HERE_COLOURS, PAPER_COLOUR = ((31, 119, 180), (255, 127, 14), (44, 160, 44)), (160, 160, 160)
RANDOM_COLOUR, REFERENCE_COLOUR = (148, 103, 189), (214, 39, 40)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


# A chart's canvas (width, height) and the margins around its plot area, in pixels.
_CANVAS, _LEFT, _RIGHT, _TOP, _BOTTOM = (960, 580), 90, 30, 90, 100
_PLOT_W, _PLOT_H = _CANVAS[0] - _LEFT - _RIGHT, _CANVAS[1] - _TOP - _BOTTOM


def _pixel_y(v: float) -> float:
    """The pixel row (y coordinate) at which a value in [0, 1] is drawn."""
    return _TOP + (1.0 - v) * _PLOT_H


def draw_chart(path: Path, title: str, xlabel: str, categories: Sequence[str],
               series: Sequence[tuple[str, tuple[int, int, int], Sequence[float], Sequence[float] | None]],
               kind: str = "bar", ylabel: str = "test top-1 accuracy", marker: int = 5) -> None:
    """A value in 0..1 (y) per category: grouped bars, or lines with markers; error bars where given.

    series: (label, RGB colour, values per category (nan: missing), standard deviations or None)."""
    img = Image.new("RGB", _CANVAS, "white")
    d = ImageDraw.Draw(img)
    _draw_frame(img, d, title, xlabel, ylabel, categories)
    small, cw = _font(14), _PLOT_W / len(categories)
    bw, legend_x = cw * 0.8 / len(series), _LEFT
    for j, (name, colour, values, errors) in enumerate(series):
        shift = (j - (len(series) - 1) / 2) * bw if kind == "bar" else 0
        points = [_draw_value(d, _LEFT + (i + 0.5) * cw + shift, v, errors[i] if errors is not None else None,
                              colour, bw if kind == "bar" else None, marker)
                  for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        if kind != "bar" and len(points) > 1:
            d.line(points, fill=colour, width=3)
        d.rectangle([legend_x, 50, legend_x + 16, 66], fill=colour)  # legend: one row under the title
        d.text((legend_x + 22, 58), name, fill="black", font=small, anchor="lm")
        legend_x += 22 + d.textlength(name, font=small) + 30
    checkpoints.atomic_write(path, lambda f: img.save(f, format="PNG"))


def _draw_frame(img: Image.Image, d: ImageDraw.ImageDraw, title: str, xlabel: str, ylabel: str,
                categories: Sequence[str]) -> None:
    """The title, the grid, both axes and their labels (the y axis's label reads upwards)."""
    (w, h), font, small = _CANVAS, _font(18), _font(14)
    d.text((w // 2, 22), title, fill="black", font=font, anchor="mm")
    for k in range(6):
        d.line([(_LEFT, _pixel_y(k / 5)), (w - _RIGHT, _pixel_y(k / 5))], fill=(225, 225, 225))
        d.text((_LEFT - 8, _pixel_y(k / 5)), f"{k / 5:.1f}", fill="black", font=small, anchor="rm")
    d.line([(_LEFT, _TOP), (_LEFT, _TOP + _PLOT_H), (w - _RIGHT, _TOP + _PLOT_H)], fill="black", width=2)
    cw = _PLOT_W / len(categories)
    for i, c in enumerate(categories):
        d.multiline_text((_LEFT + (i + 0.5) * cw, _TOP + _PLOT_H + 10), c, fill="black", font=small, anchor="ma",
                         align="center")
    d.text((_LEFT + _PLOT_W / 2, h - 20), xlabel, fill="black", font=font, anchor="mm")
    label = Image.new("RGB", (_PLOT_H, 30), "white")
    ImageDraw.Draw(label).text((_PLOT_H // 2, 15), ylabel, fill="black", font=font, anchor="mm")
    img.paste(label.rotate(90, expand=True), (8, _TOP))


def _draw_value(d: ImageDraw.ImageDraw, x: float, v: float, error: float | None, colour: tuple[int, int, int],
                bar_width: float | None, marker: int) -> tuple[float, float]:
    """One value at column x: a bar (bar_width given) or a marker, with its error bar; returns its point."""
    if bar_width is not None:
        d.rectangle([x - bar_width / 2 + 2, _pixel_y(v), x + bar_width / 2 - 2, _pixel_y(0)], fill=colour)
    else:
        d.ellipse([x - marker, _pixel_y(v) - marker, x + marker, _pixel_y(v) + marker], fill=colour)
    if error:
        lo, hi = _pixel_y(max(0.0, v - error)), _pixel_y(min(1.0, v + error))
        for seg in ([(x, lo), (x, hi)], [(x - 5, lo), (x + 5, lo)], [(x - 5, hi), (x + 5, hi)]):
            d.line(seg, fill="black", width=2)
    return x, _pixel_y(v)


def draw_figures(out: Path, summary: dict, tasks: dict[str, data.TaskData], n_seeds: int) -> list[str]:
    """figure2.png (Table 1 as bars beside the paper's) and figure6.png (Table 4 against classes)."""
    here = f"here (mean ± std, {n_seeds} seeds)" if n_seeds > 1 else "here (one seed)"
    keys = [k for k, _, _ in STUDY1_ROWS]
    stats = [mean_std(summary["table1"][k]) for k in keys]
    draw_chart(out / "figure2.png", "Figure 2: augmentation during fine-tuning (Table 1)",
               "operations used while fine-tuning", keys,
               [(here, HERE_COLOURS[0], [m for m, _ in stats], [s for _, s in stats]),
                ("paper (tf_flowers)", PAPER_COLOUR, [PAPER_TABLE1[k] for k in keys], None)])
    names, references, big = summary["study3_tasks"], summary["reference_tasks"], str(max(summary["batch_sizes"]))
    # The transfer tasks' lines skip the in-domain references, which get markers of their own.
    line = lambda values, keep: ([m if keep(t) else float("nan") for t, m in zip(names, values[0])],  # noqa: E731
                                 [s for s in values[1]])
    stats = lambda table: tuple(zip(*[mean_std(table[t]) for t in names]))  # noqa: E731
    series = [(f"batch {b}", HERE_COLOURS[j % 3], *line(stats({t: summary["table4"][t][str(b)] for t in names}),
                                                        lambda t: t not in references))
              for j, b in enumerate(summary["batch_sizes"])]
    if summary["table4_random"]:
        random = {t: summary["table4_random"].get(t, [float("nan")]) for t in names}
        series.append((f"random encoder, batch {big}", RANDOM_COLOUR, *line(stats(random),
                                                                            lambda t: t not in references)))
    if references:
        series.append((f"in-domain reference, batch {big}", REFERENCE_COLOUR,
                       *line(stats({t: summary["table4"][t][big] for t in names}), lambda t: t in references)))
    paper = [float("nan") if t in references else PAPER_TABLE4.get(tasks[t].num_classes, (None, float("nan")))[1]
             for t in names]
    series.append(("paper, batch 64", PAPER_COLOUR, paper, None))
    labels = [f"{tasks[t].num_classes}\n{_short(t)}" + ("\n(in-domain)" if t in references else "") for t in names]
    draw_chart(out / "figure6.png", f"Figure 6: linear transfer vs number of classes (Table 4); {here}",
               "number of classes (task)", labels, series, kind="line")
    return ["figure2.png", "figure6.png"]


def draw_pretraining(path: Path, log: Sequence[dict], batch_size: int, eval_data: str, title: str) -> None:
    """The pretraining curve from a run's log.jsonl: kNN top-1 and the NT-Xent loss per epoch, the
    loss divided by ln(2N - 1), the loss of a network that cannot tell the positive from the 2N - 2
    negatives, so that both read on one 0..1 axis."""
    epochs = max((math.ceil(r["epoch"] - 1e-9) for r in log if "epoch" in r), default=0)
    knn, loss = [float("nan")] * epochs, [[] for _ in range(epochs)]
    for r in log:
        if "knn_top1" in r:
            knn[r["epoch"] - 1] = r["knn_top1"]
        elif "loss" in r:
            loss[math.ceil(r["epoch"] - 1e-9) - 1].append(r["loss"] / math.log(2 * batch_size - 1))
    step = max(1, epochs // 10)
    draw_chart(path, title, "epoch", [str(e) if e % step == 0 else "" for e in range(1, epochs + 1)],
               [(f"kNN top-1 ({_short(eval_data)} val)", HERE_COLOURS[0], knn, None),
                ("NT-Xent loss / ln(2N - 1)", HERE_COLOURS[1], [statistics.fmean(v) if v else float("nan")
                                                                for v in loss], None)],
               kind="line", ylabel="kNN top-1, relative loss", marker=2)


# ----------------------------------------------------------------------------------------------
# results.json, results.md and the figures, written together


def _versions() -> dict:
    return dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                pillow=PIL.__version__, tqdm=tqdm_module.__version__, platform=platform.platform())


def device_info(device: torch.device) -> dict:
    """The device a run used, as results.json records it: its type and a name a reader can look up."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
               f"{torch.get_num_threads()} torch threads)"
    return dict(type=device.type, name=name)


def _unnamed(where: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def write_results(out: Path, meta: dict, settings: dict, mapping: dict,
                  tasks: tuple[dict[str, data.TaskData], dict[str, data.TaskData]], records: dict, runs: dict,
                  summary: dict, part: Callable[[str], contextlib.AbstractContextManager] = _unnamed) -> dict:
    """results.json (every number, the settings, versions and stage times), results.md and the figures.
    tasks: (Studies 1 and 2's, Study 3's). part(where) is entered around the drawing of the figures, so
    that run_all can say where an interrupt landed (run_all._part)."""
    sizes = lambda ts: {k: dict(classes=t.num_classes, train=len(t.train), val=len(t.val),  # noqa: E731
                                test=len(t.test), image_size=meta["image_size"]) for k, t in ts.items()}
    results = dict(meta, settings=settings, versions=_versions(), data=mapping,
                   tasks=dict(study1_2=sizes(tasks[0]), study3=sizes(tasks[1])),
                   stages={k: dict(wall_s=v["wall_s"], reused=v["reused"], finished=v["finished"])
                           for k, v in records.items()},
                   runs=runs, **summary)
    checkpoints.atomic_write_text(json.dumps(results, indent=2, default=str) + "\n", out / "results.json")
    markdown = results_markdown(summary, meta, *tasks, mapping, runs)
    checkpoints.atomic_write_text(markdown, out / "results.md")
    with part("while drawing the figures"):
        figures = draw_figures(out, summary, tasks[1], len(meta["seeds"]))
    curve = pretraining_log(meta["checkpoint"])
    if curve is not None:
        draw_pretraining(out / "pretraining.png", *curve, f"Pretraining of the encoder: {meta['encoders']['teacher']}")
        figures.append("pretraining.png")
    print(markdown)
    print(f"Wrote results.json, results.md and {', '.join(figures)} into {out} in {results['wall_s']:.0f} s.",
          file=sys.stderr)
    return results


def pretraining_log(checkpoint: str) -> tuple[list[dict], int, str] | None:
    """(log records, batch size, kNN task) of the run that made a pretraining checkpoint: the log
    kept beside a released file, or the run folder's own; None when neither is there."""
    path = Path(checkpoint)
    for log in (Path(f"{path}.log.jsonl"), path.parent / "log.jsonl" if path.name == "checkpoint.pt" else None):
        if log is not None and log.is_file():
            config = json.loads(checkpoints.load_checkpoint(path)["config"])
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            return records, config["batch_size"], config.get("eval_data") or "?"
    return None
