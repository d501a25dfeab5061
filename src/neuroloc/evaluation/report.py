"""Plots and a Markdown report of an evaluation."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from neuroloc.classes import short_class_name
from neuroloc.evaluation.harness import MethodRun, read_predictions
from neuroloc.evaluation.metrics import (
    BOX_COUNT_GROUPS,
    BOX_COUNT_METRICS,
    CENTRE_MARGINS,
    CLASS_METRICS,
    COVERAGES,
    PAIRED_METRICS,
    SIZE_BINS,
    PairedDifference,
    coverage_accuracy,
)
from neuroloc.imageio import ImageError, load_image

TABLE_COLUMNS = (
    ("gt_known", "GT-known loc"),
    ("top1_loc", "top-1 loc"),
    ("mean_iou", "mean IoU"),
    ("acc@0.3", "IoU≥0.3"),
    ("acc@0.5", "IoU≥0.5"),
    ("acc@0.7", "IoU≥0.7"),
    ("centre@0.0", "centre m=0"),
    ("centre@0.2", "centre m=0.2"),
    ("maxboxaccv2", "MaxBoxAccV2"),
    ("pointing", "pointing"),
    ("gt_known_small", "GT-k small"),
    ("gt_known_medium", "GT-k medium"),
    ("gt_known_large", "GT-k large"),
    ("seconds_per_image", "s/img"),
)


def markdown_table(table: dict[str, dict[str, float]]) -> str:
    lines = ["| method | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"]
    lines.append("|---" * (len(TABLE_COLUMNS) + 1) + "|")
    for name, row in table.items():
        cells = []
        for key, _ in TABLE_COLUMNS:
            value = row.get(key)
            if value is None or (isinstance(value, float) and np.isnan(value)):
                cells.append("–")
            elif key == "mean_iou" or key == "seconds_per_image":
                cells.append(f"{value:.3f}")
            else:
                cells.append(f"{value:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRED_COLUMNS = tuple((key, dict(TABLE_COLUMNS)[key]) for key in PAIRED_METRICS)


def comparison_table(reference: str, comparisons: dict[str, dict[str, PairedDifference]]) -> str:
    """``reference`` minus each method, with 95 % bootstrap intervals: an interval that excludes 0
    is a lead (or a lag) that resampling the images does not undo."""
    if not comparisons:
        return ""
    lines = [f"| {reference} minus | images | " + " | ".join(title for _, title in PAIRED_COLUMNS) + " |"]
    lines.append("|---" * (len(PAIRED_COLUMNS) + 2) + "|")
    for name, row in comparisons.items():
        cells = []
        for key, _ in PAIRED_COLUMNS:
            d = row[key]
            digits = 3 if key == "mean_iou" else 1
            cells.append(f"{_signed(d.difference, digits)} [{_signed(d.low, digits)}, {_signed(d.high, digits)}]")
        images = next(iter(row.values())).images
        lines.append(f"| {name} | {images} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _signed(value: float, digits: int) -> str:
    """A difference with its sign, or "–" where it is undefined (no image, or one image for an interval)."""
    return "–" if np.isnan(value) else f"{value:+.{digits}f}"


def comparison_section(reference: str, comparisons: dict[str, dict[str, dict[str, PairedDifference]]]) -> list[str]:
    """Report lines for ``comparisons`` keyed by part of the data ("all", "tune", "test")."""
    if not comparisons.get("all"):
        return []
    lines = [
        f"## {reference} against each method, image by image",
        "",
        ("Mean difference on the images both methods scored, with a 95 % bootstrap interval over images "
         "(percentage points; mean IoU in IoU units). An interval that excludes 0 is a difference that "
         "resampling the images does not undo."),
        "",
    ]
    for part, rows in comparisons.items():
        lines += [("all images" if part == "all" else f"{part} half") + ":", "", comparison_table(reference, rows), ""]
    return lines


CENTRE_SWEEP_COLUMNS = (
    ("gt_known", "GT-known loc"),
    ("mean_iou", "mean IoU"),
    ("acc@0.7", "IoU≥0.7"),
    ("centre@0.2", "centre m=0.2"),
)


def centre_scale_section(
    sweeps: dict[str, dict[str, dict[str, float]]], best: dict[str, str], chosen_on: str
) -> list[str]:
    """Report lines for the centred box at every scale: one table per part (``all``, ``tune``, ``test``),
    and the best area per metric as chosen on the part ``chosen_on``."""
    lines = [
        "## Centred box by scale",
        "",
        "The centred box at each share of the image area (it needs no model). Best scale on the "
        f"{chosen_on} images: "
        + ", ".join(f"{label} at {best[key]}" for key, label in CENTRE_SWEEP_COLUMNS if key in best)
        + ".",
        "",
    ]
    for part, sweep in sweeps.items():
        head = "| area | images | " + " | ".join(label for _, label in CENTRE_SWEEP_COLUMNS) + " |"
        rows = [f"{part}:", "", head, "|" + "---|" * (len(CENTRE_SWEEP_COLUMNS) + 2)]
        for area, row in sweep.items():
            cells = []
            for key, _ in CENTRE_SWEEP_COLUMNS:
                text = f"{row[key]:.3f}" if key == "mean_iou" else f"{row[key]:.1f}"
                cells.append(f"**{text}**" if best.get(key) == area else text)
            rows.append(f"| {area} | {int(row['images'])} | " + " | ".join(cells) + " |")
        lines += [*rows, ""]
    return lines


SIZE_COLUMNS = (
    ("gt_known", "GT-known"), ("mean_iou", "mean IoU"), ("acc@0.7", "IoU≥0.7"), ("centre@0.2", "centre m=0.2"), ("pointing", "pointing"),
)
BOX_COUNT_TITLES = {"one_box": "one true box", "several_boxes": "several true boxes"}


def breakdown_table(
    table: dict[str, dict[str, float]], columns: Sequence[tuple[str, str]], groups: Sequence[tuple[str, str]]
) -> str:
    """One row per method: each metric of ``columns`` (key, title) on each group of ``groups`` (key, title),
    from the ``<metric>_<group>`` and ``n_<group>`` entries :func:`summarize` writes."""
    if not table:
        return ""
    first = next(iter(table.values()))
    heads = [f"{title} {name} (n={int(first.get(f'n_{group}', 0))})" for key, title in columns for group, name in groups]
    lines = ["| method | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for method, row in table.items():
        cells = []
        for key, _ in columns:
            for group, _ in groups:
                value = row.get(f"{key}_{group}", float("nan"))
                cells.append("–" if np.isnan(value) else f"{value:.3f}" if key == "mean_iou" else f"{value:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def size_table(table: dict[str, dict[str, float]]) -> str:
    """Each metric of :data:`SIZE_COLUMNS` per object size (:data:`SIZE_BINS`), one row per method."""
    return breakdown_table(table, SIZE_COLUMNS, [(name, name) for name, _, _ in SIZE_BINS])


def box_count_table(table: dict[str, dict[str, float]]) -> str:
    """GT-known and centre correctness (margin 0.2) on images with one true box and with several."""
    columns = [(key, title) for key, title in SIZE_COLUMNS if key in BOX_COUNT_METRICS]
    return breakdown_table(table, columns, [(group, BOX_COUNT_TITLES[group]) for group in BOX_COUNT_GROUPS])


def class_csv(per_class: Mapping[str, Mapping[int, Mapping[str, float]]], names: Mapping[int, tuple[str, str]]) -> str:
    """Every class (rows) x every method's :data:`CLASS_METRICS` (columns ``method:metric``), as CSV text;
    ``names``: class -> (synset, name)."""
    methods = list(per_class)
    labels = sorted({label for rows in per_class.values() for label in rows})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "synset", "name", "images", *(f"{m}:{k}" for m in methods for k in CLASS_METRICS)])
    for label in labels:
        synset, name = names.get(label, ("", ""))
        images = max(int(per_class[m][label]["images"]) for m in methods if label in per_class[m])
        cells = []
        for m in methods:
            row = per_class[m].get(label)
            cells += [("" if row is None else f"{row[k]:.4f}" if k == "mean_iou" else f"{row[k]:.1f}") for k in CLASS_METRICS]
        writer.writerow([label, synset, name, images, *cells])
    return buffer.getvalue()


def hardest_classes_table(
    per_class: Mapping[str, Mapping[int, Mapping[str, float]]],
    names: Mapping[int, tuple[str, str]],
    limit: int = 15,
    min_images: int = 2,
) -> str:
    """GT-known of every method on the ``limit`` classes (with at least ``min_images`` images) where the
    first method's GT-known is lowest; ties go to the class with more images."""
    methods = list(per_class)
    if not methods:
        return ""
    reference = per_class[methods[0]]
    candidates = [label for label, row in reference.items() if row["images"] >= min_images]
    chosen = sorted(candidates, key=lambda label: (reference[label]["gt_known"], -reference[label]["images"], label))[:limit]
    if not chosen:
        return ""
    lines = ["| class | images | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for label in chosen:
        cells = [f"{per_class[m][label]['gt_known']:.0f}" if label in per_class[m] else "–" for m in methods]
        lines.append(f"| {names.get(label, ('', str(label)))[1]} ({label}) | {int(reference[label]['images'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confidence_table(table: dict[str, dict[str, float]]) -> str:
    """ROC AUC for "IoU >= 0.5" and GT-known of the most confident images, by confidence and by class probability."""
    shares = [f"top {int(100 * c)} %" for c in COVERAGES]
    lines = ["| method | ranked by | ROC AUC | " + " | ".join(f"GT-known {s}" for s in shares) + " |"]
    lines.append("|---" * (len(COVERAGES) + 3) + "|")
    for name, row in table.items():
        if "confidence_auc" not in row:
            continue
        for ranking in ("confidence", "probability"):
            cells = [f"{row[f'{ranking}_gt_known@{c}']:.1f}" for c in COVERAGES]
            auc = row[f"{ranking}_auc"]  # undefined when every box, or none, is right
            lines.append(f"| {name} | {ranking} | {'–' if np.isnan(auc) else f'{auc:.3f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def line_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A style per method that no other method in the plot shares: matplotlib's default cycle has ten
    colours, so a full comparison (13 methods) drew three pairs alike. Colours come from tab20, strong ones
    first; past ten methods the lines are dashed as well; neuroloc's own methods (``dam...``) are drawn wider."""
    tab20 = plt.get_cmap("tab20")
    palette = [tab20(k) for k in range(20)]  # a listed colour map: an integer picks its k-th colour
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {
        name: {"color": palette[order[i % 20]], "marker": _MARKERS[i % len(_MARKERS)],
               "linestyle": "-" if i < 10 else "--", "linewidth": 2.0 if name.startswith("dam") else 1.2}
        for i, name in enumerate(names)
    }


def write_plots(runs: Sequence[MethodRun], table: dict[str, dict[str, float]], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    styles = line_styles([*dict.fromkeys([run.name for run in runs] + list(table))])
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 21).tolist()
    for run in runs:
        look = styles[run.name]
        ax.hist([s.iou for s in run.scores], bins=bins, histtype="step", label=run.name, color=look["color"],
                linestyle=look["linestyle"], linewidth=look["linewidth"])
    ax.axvline(0.5, color="grey", linestyle=":")
    ax.set(xlabel="IoU with the best ground-truth box", ylabel="images", title="IoU histogram")
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, folder / "iou_histogram.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in table.items():
        if f"centre@{CENTRE_MARGINS[0]}" not in row:  # a method that scored no image
            continue
        ax.plot(CENTRE_MARGINS, [row[f"centre@{m}"] for m in CENTRE_MARGINS], markersize=3, label=name, **styles[name])
    ax.set(xlabel="margin fraction", ylabel="% images with box centre inside", title="Centre correctness vs margin")
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, folder / "centre_correctness.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(table)
    width = 0.8 / len(SIZE_BINS)
    for j, (bin_name, _, _) in enumerate(SIZE_BINS):
        values = [table[n].get(f"gt_known_{bin_name}", np.nan) for n in names]
        count = max(int(table[n].get(f"n_{bin_name}", 0)) for n in names)
        ax.bar(np.arange(len(names)) + j * width, values, width, label=f"{bin_name} (n={count})")
    ax.set_xticks(np.arange(len(names)) + width, names, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="GT-known localization %", title="GT-known localization by object size")
    ax.legend(fontsize=7)
    paths.append(_save(fig, folder / "gt_known_by_size.png"))

    confident = [run for run in runs if run.scores and all(sc.confidence is not None for sc in run.scores)]
    if confident:
        fig, ax = plt.subplots(figsize=(7, 4))
        shares = np.linspace(0.05, 1.0, 20)
        for k, run in enumerate(confident):
            correct = np.array([sc.iou >= 0.5 for sc in run.scores])
            for ranking, style in (("confidence", "-"), ("probability", "--")):
                ranked_by = np.array([getattr(sc, ranking) or 0.0 for sc in run.scores])
                curve = [coverage_accuracy(correct, ranked_by, c) for c in shares]
                ax.plot(100 * shares, curve, style, color=f"C{k}", marker="o", markersize=3, label=f"{run.name} by {ranking}")
            ax.axhline(100 * correct.mean(), color=f"C{k}", linestyle=":", linewidth=1)
        ax.set(xlabel="% of images kept (most confident first)", ylabel="GT-known localization %",
               title="Coverage: accuracy of the most confident boxes")
        ax.legend(fontsize=7)
        paths.append(_save(fig, folder / "confidence_coverage.png"))
    return paths


def write_gallery(
    run: MethodRun,
    predictions: Path,
    truths: Mapping[str, Sequence[Sequence[float]]],
    path: Path,
    count: int = 8,
    thumbnail: int = 256,
    intensity: str = "range",
) -> Path | None:
    """The ``count`` images where ``run`` scored best and worst (IoU with the best-matching true box):
    its box in red, the true boxes in green. ``predictions`` is the run's predictions.jsonl; ``truths``
    maps a sample key (:attr:`~neuroloc.evaluation.dataset.Sample.key`) to its true boxes. None when the run scored no image."""
    if not run.scores:
        return None
    records = read_predictions(predictions)
    order = sorted(range(len(run.scores)), key=lambda j: (run.scores[j].iou, run.images[j]))
    rows = [("best", order[::-1][:count]), ("worst", order[:count])]
    fig, axes = plt.subplots(2, count, figsize=(2 * count, 5.0), squeeze=False)
    for r, (title, chosen) in enumerate(rows):
        for c in range(count):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(chosen):
                continue
            name = run.images[chosen[c]]
            record = records.get(name)
            if record is None:
                continue
            try:
                image = load_image(record["image"], draft_size=thumbnail, intensity=intensity)
            except ImageError:
                continue
            image.thumbnail((thumbnail, thumbnail))
            ax.imshow(image)
            sx, sy = image.size[0] / record["width"], image.size[1] / record["height"]
            for box, colour in [*((t, "lime") for t in truths.get(name, ())), (record["predictions"][0]["box"], "red")]:
                x0, y0, x1, y1 = box
                ax.add_patch(plt.Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False, color=colour, linewidth=1.5))
            first = record["predictions"][0]
            label = short_class_name(str(first.get("name", "")), first.get("synset"))
            ax.set_title(f"{title}: IoU {run.scores[chosen[c]].iou:.2f}\n{label}", fontsize=7)
    fig.suptitle(f"{run.name}: its box red, true boxes green", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path, dpi=80)


def _save(fig, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
