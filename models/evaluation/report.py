"""The evaluation report: one self-contained folder with ``report.md`` and its plots.

:func:`write_report` turns what the eval command knows (one :class:`ImageRecord` per
test image, the metrics JSON, and optionally training histories, sweep trials and
heatmaps) into a markdown page read top to bottom: summary, per category,
ROC/PR, confusion, which stage decided, score distributions, heatmap examples, the
worst mistakes, learning curves, sweeps. Plots are PNG files beside ``report.md``,
referenced by relative name, so the folder can be zipped or served as is.

Figures are built on :class:`matplotlib.figure.Figure` directly rather than pyplot:
no global figure registry to leak into, no backend to select, safe in threads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from models.evaluation.defect_report import defect_type_section, grade_section
from models.evaluation.figures import (
    DPI,
    draw_counts,
    load_rgb,
    md_cell,
    md_table,
    missing_image,
    panels,
    save_figure,
    shorten,
    slug,
)
from models.evaluation.records import ImageRecord
from models.metrics import image_auroc

REPORT_FILE = "report.md"
HEATMAP_CMAP = "jet"
HEATMAP_ALPHA = 0.45

# The report owns the PNGs it names: a rerun into the same folder first removes
# these, so that every PNG in the folder is one that report.md references.
_FIXED_FIGURES = (
    "roc_pr.png",
    "confusion.png",
    "scores.png",
    "heatmaps.png",
    "worst_fp.png",
    "worst_fn.png",
)
_KEYED_PREFIXES = ("learning_", "sweep_", "types_")
_GOOD_COLOR = "tab:green"
_DEFECT_COLOR = "tab:red"
_BEST_COLOR = "crimson"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def write_report(
    out_dir: Path,
    *,
    dataset: str,
    records: Sequence[ImageRecord],
    metrics: Mapping[str, Any],
    histories: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    heatmaps: Mapping[str, np.ndarray] | None = None,
    n_worst: int = 6,
) -> Path:
    """Write OUT_DIR/report.md and its PNG plots; return the path of report.md.

    Args:
        out_dir: folder of the report; created if needed. PNGs a previous report
            wrote there (by this module's file names) are replaced.
        dataset: dataset name, for the title.
        records: one record per test image; ``sample_id`` must be unique.
        metrics: the eval command's metrics JSON. Every top-level scalar is shown;
            ``per_category`` (category -> scalars) becomes a table; optional
            ``threshold`` and ``band_lo``/``band_hi`` are drawn on the score
            histograms (a category's own ``threshold`` wins for its panel).
        histories: ``"<category>/<stage>"`` -> per-epoch dicts (``epoch`` plus any
            numeric keys; keys containing ``loss`` are plotted apart from the rest;
            ``lr`` and ``*seconds`` are not plotted).
        sweeps: ``"<category>/<stage>"`` -> trials, each with ``trial_id``,
            ``config`` (``lr``, ``batch_size``, ``optimizer``), ``metric``,
            ``history`` (per-epoch dicts) and ``best``. A trial's best value is the
            max of its metric, or the min when the name contains ``loss``/``error``.
        heatmaps: ``sample_id`` -> heatmap (H, W) in [0, 1], any resolution.
        n_worst: how many false positives and false negatives to show, each.

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: ``records`` is empty, has a repeated ``sample_id`` or a
            non-finite score; ``n_worst`` is negative; a heatmap is not 2-D.
    """
    _check_records(records)
    if n_worst < 0:
        raise ValueError(f"n_worst must be >= 0; got {n_worst}")
    maps = {sid: _as_map(sid, m) for sid, m in sorted((heatmaps or {}).items())}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_figures(out_dir)

    by_category: dict[str, list[ImageRecord]] = {}
    for record in sorted(records, key=lambda r: (r.category, r.sample_id)):
        by_category.setdefault(record.category, []).append(record)
    groups = [("overall", list(records)), *by_category.items()]

    lines = [
        f"# Evaluation report: {dataset}",
        "",
        f"{len(records)} test images in {len(by_category)} "
        f"{'category' if len(by_category) == 1 else 'categories'}: "
        + ", ".join(f"`{c}`" for c in by_category)
        + ".",
        "",
    ]
    lines += _summary_section(metrics)
    lines += _per_category_section(metrics)
    lines += _roc_pr_section(out_dir, groups)
    lines += _confusion_section(out_dir, groups)
    lines += _stage_section(records)
    lines += defect_type_section(out_dir, records)
    lines += grade_section(out_dir, records)
    lines += _localizer_section(metrics)
    lines += _score_section(out_dir, groups, metrics)
    lines += _heatmap_section(out_dir, maps, {r.sample_id: r for r in records})
    false_positives = sorted(
        (r for r in records if not r.is_anomalous and r.predicted_anomalous),
        key=lambda r: (-r.anomaly_score, r.sample_id),
    )
    false_negatives = sorted(
        (r for r in records if r.is_anomalous and not r.predicted_anomalous),
        key=lambda r: (r.anomaly_score, r.sample_id),
    )
    lines += _worst_section(
        out_dir,
        heading="Worst false positives",
        file_name="worst_fp.png",
        mistakes=false_positives,
        n_worst=n_worst,
        what="good parts called defective, highest anomaly score first",
        none="None: no good part was called defective.",
    )
    lines += _worst_section(
        out_dir,
        heading="Worst false negatives",
        file_name="worst_fn.png",
        mistakes=false_negatives,
        n_worst=n_worst,
        what="defective parts called ok, lowest anomaly score first",
        none="None: no defective part was called ok.",
    )
    lines += _learning_section(out_dir, histories or {})
    lines += _sweep_section(out_dir, sweeps or {})

    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- checks


def _check_records(records: Sequence[ImageRecord]) -> None:
    if not records:
        raise ValueError("write_report needs at least one ImageRecord; got none")
    seen: set[str] = set()
    for record in records:
        if record.sample_id in seen:
            raise ValueError(f"sample_id {record.sample_id!r} appears more than once in records")
        seen.add(record.sample_id)
        if not math.isfinite(record.anomaly_score):
            raise ValueError(
                f"anomaly_score of {record.sample_id!r} is {record.anomaly_score}; "
                "it must be a finite number"
            )


def _as_map(sample_id: str, heatmap: np.ndarray) -> np.ndarray:
    array = np.squeeze(np.asarray(heatmap, dtype=np.float32))
    if array.ndim != 2:
        raise ValueError(
            f"heatmap of {sample_id!r} must be 2-D (H, W); got shape {np.shape(heatmap)}"
        )
    return np.clip(np.nan_to_num(array), 0.0, 1.0)


def _remove_previous_figures(out_dir: Path) -> None:
    for path in out_dir.glob("*.png"):
        if path.name in _FIXED_FIGURES or path.name.startswith(_KEYED_PREFIXES):
            path.unlink()


# ------------------------------------------------------------------------ sections


def _summary_section(metrics: Mapping[str, Any]) -> list[str]:
    rows = [[md_cell(key), _fmt(value)] for key, value in metrics.items() if _is_scalar(value)]
    lines = ["## Summary metrics", ""]
    if not rows:
        return [*lines, "No scalar metrics recorded.", ""]
    return [*lines, *md_table(["metric", "value"], rows), ""]


def _per_category_section(metrics: Mapping[str, Any]) -> list[str]:
    lines = ["## Per category", ""]
    per_category = metrics.get("per_category")
    if not isinstance(per_category, Mapping) or not per_category:
        return [*lines, "No per-category metrics recorded.", ""]
    columns: list[str] = []
    for values in per_category.values():
        if isinstance(values, Mapping):
            columns += [k for k, v in values.items() if _is_scalar(v) and k not in columns]
    rows = []
    for category in sorted(per_category):
        values = per_category[category]
        values = values if isinstance(values, Mapping) else {}
        rows.append([md_cell(category)] + [_fmt(values[c]) if c in values else "" for c in columns])
    return [*lines, *md_table(["category", *columns], rows), ""]


def _localizer_section(metrics: Mapping[str, Any]) -> list[str]:
    """The localizer's COCO figures: per class, by object size, by category."""
    found = metrics.get("localizer")
    if not isinstance(found, Mapping):
        return []
    lines = [
        "## Defect boxes (localizer)",
        "",
        f"COCO protocol over {found['n_images']} test images ({found['n_ground_truth']} boxes; "
        f"good images included, where every box is a false positive): mAP@0.5 "
        f"{_fmt(found['map50'])}, mAP@0.5:0.95 {_fmt(found['map50_95'])}; at IoU "
        f"{found['iou_threshold']} and score >= {found['score_threshold']}, precision "
        f"{_fmt(found['precision'])} and recall {_fmt(found['recall'])}.",
        "",
    ]
    classes = found["ap50_per_class"]
    pr = found.get("precision_recall_per_class", {})
    rows = [
        [
            md_cell(name),
            _fmt(classes[name]),
            _fmt(found["ap50_95_per_class"].get(name)),
            _fmt(pr.get(name, {}).get("precision")),
            _fmt(pr.get(name, {}).get("recall")),
        ]
        for name in sorted(classes)
    ]
    lines += md_table(["type", "AP@0.5", "AP@0.5:0.95", "precision", "recall"], rows)
    sizes = found.get("ap_by_size", {})
    rows = [
        [
            size,
            str(found.get("n_ground_truth_by_size", {}).get(size, "")),
            _fmt(sizes[size]),
            _fmt(found.get("ap50_by_size", {}).get(size)),
        ]
        for size in ("small", "medium", "large")
        if size in sizes
    ]
    if rows:
        lines += ["", *md_table(["object size", "boxes", "AP@0.5:0.95", "AP@0.5"], rows)]
    return [*lines, ""]


def _roc_pr_section(out_dir: Path, groups: list[tuple[str, list[ImageRecord]]]) -> list[str]:
    lines = ["## ROC and precision-recall curves", ""]
    fig = Figure(figsize=(10, 4.4), dpi=DPI, layout="constrained")
    ax_roc, ax_pr = fig.subplots(1, 2)
    rows, notes = [], []
    for name, group in groups:
        truth = np.array([r.is_anomalous for r in group], dtype=int)
        scores = np.array([r.anomaly_score for r in group], dtype=float)
        if truth.min() == truth.max():
            kind = "defective" if truth[0] else "good"
            notes.append(
                f"- `{name}` skipped: all its {len(truth)} images are {kind}; "
                "ROC and PR need both classes."
            )
            continue
        fpr, tpr, _ = roc_curve(truth, scores)
        precision, recall, _ = precision_recall_curve(truth, scores)
        auroc = image_auroc(truth.astype(bool), scores)
        ap = float(average_precision_score(truth, scores))
        style = {"color": "black", "linewidth": 2.2} if name == "overall" else {"linewidth": 1.2}
        ax_roc.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.4f})", **style)
        ax_pr.step(recall, precision, where="post", label=f"{name} (AP {ap:.4f})", **style)
        rows.append([md_cell(name), str(len(truth)), str(int(truth.sum())), _fmt(auroc), _fmt(ap)])
    if not rows:
        return [*lines, "Curves skipped: no group has both good and defective images.", *notes, ""]
    ax_roc.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax_pr.set(xlabel="recall", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
        ax.grid(alpha=0.3)
    name = save_figure(fig, out_dir, "roc_pr.png")
    lines += [f"![ROC and precision-recall curves]({name})", ""]
    lines += md_table(["group", "images", "defective", "AUROC", "AP"], rows)
    if notes:
        lines += ["", *notes]
    return [*lines, ""]


def _confusion_section(out_dir: Path, groups: list[tuple[str, list[ImageRecord]]]) -> list[str]:
    fig, axes = panels(len(groups))
    for ax, (name, group) in zip(axes, groups, strict=True):
        draw_counts(ax, _confusion(group), ["ok", "defective"], ["good", "defective"])
        ax.set(xlabel="verdict", ylabel="truth", title=name)
    name = save_figure(fig, out_dir, "confusion.png")
    counts = _confusion(groups[0][1])
    return [
        "## Confusion matrix",
        "",
        "Rows are the truth, columns the pipeline's verdict.",
        "",
        f"![Confusion matrices, overall and per category]({name})",
        "",
        *md_table(
            ["truth \\ verdict", "ok", "defective"],
            [["good", *map(str, counts[0])], ["defective", *map(str, counts[1])]],
        ),
        "",
    ]


def _stage_section(records: Sequence[ImageRecord]) -> list[str]:
    stages = ["detector", "verifier"]
    stages += sorted({r.decided_by for r in records} - set(stages))
    rows = []
    for stage in stages:
        subset = [r for r in records if r.decided_by == stage]
        correct = sum(r.is_anomalous == r.predicted_anomalous for r in subset)
        rows.append(
            [
                md_cell(stage),
                str(len(subset)),
                _fmt(len(subset) / len(records)),
                str(correct),
                _fmt(correct / len(subset)) if subset else "n/a",
            ]
        )
    return [
        "## Which stage decided",
        "",
        *md_table(["stage", "images", "share", "correct", "accuracy"], rows),
        "",
    ]


def _score_section(
    out_dir: Path, groups: list[tuple[str, list[ImageRecord]]], metrics: Mapping[str, Any]
) -> list[str]:
    threshold = metrics.get("threshold")
    band_lo, band_hi = metrics.get("band_lo"), metrics.get("band_hi")
    has_band = _is_number(band_lo) and _is_number(band_hi)
    per_category = metrics.get("per_category")
    per_category = per_category if isinstance(per_category, Mapping) else {}

    all_scores = [r.anomaly_score for r in groups[0][1]]
    bins = np.linspace(min(0.0, *all_scores), max(1.0, *all_scores), 21)
    fig, axes = panels(len(groups), size=(3.2, 2.6))
    for ax, (name, group) in zip(axes, groups, strict=True):
        good = [r.anomaly_score for r in group if not r.is_anomalous]
        defective = [r.anomaly_score for r in group if r.is_anomalous]
        ax.hist(good, bins=bins, alpha=0.6, color=_GOOD_COLOR, label=f"good ({len(good)})")
        ax.hist(
            defective,
            bins=bins,
            alpha=0.6,
            color=_DEFECT_COLOR,
            label=f"defective ({len(defective)})",
        )
        own = per_category.get(name)
        own_threshold = own.get("threshold") if isinstance(own, Mapping) else None
        line = own_threshold if _is_number(own_threshold) else threshold
        if _is_number(line):
            ax.axvline(float(line), color="black", linestyle="--", label=f"threshold {line:.3f}")
        if has_band:
            ax.axvspan(
                float(band_lo), float(band_hi), color="gray", alpha=0.2, label="verifier band"
            )
        ax.set(xlabel="anomaly score", ylabel="images", title=name)
        ax.legend(fontsize=7)
    name = save_figure(fig, out_dir, "scores.png")
    lines = ["## Score distributions", "", f"![Anomaly score histograms]({name})", ""]
    if _is_number(threshold):
        lines.append(f"Dashed line: decision threshold {_fmt(float(threshold))}.")
    if has_band:
        lines.append(f"Shaded: the verifier band [{_fmt(float(band_lo))}, {_fmt(float(band_hi))}].")
    return [*lines, ""]


def _heatmap_section(
    out_dir: Path, maps: Mapping[str, np.ndarray], by_id: Mapping[str, ImageRecord]
) -> list[str]:
    lines = ["## Heatmap examples", ""]
    if not maps:
        return [*lines, "No heatmaps supplied.", ""]
    known = [sid for sid in maps if sid in by_id]
    unknown = [sid for sid in maps if sid not in by_id]
    if known:
        fig, axes = panels(2 * len(known), ncols=2, size=(3.0, 3.0))
        for i, sample_id in enumerate(known):
            record = by_id[sample_id]
            ax_image, ax_cam = axes[2 * i], axes[2 * i + 1]
            image = load_rgb(record.image_path)
            if image is None:
                missing_image(ax_image, record.image_path)
                ax_cam.imshow(maps[sample_id], cmap=HEATMAP_CMAP, vmin=0, vmax=1)
            else:
                overlay = _resize_map(maps[sample_id], image.shape[1], image.shape[0])
                ax_image.imshow(image)
                ax_cam.imshow(image)
                ax_cam.imshow(overlay, cmap=HEATMAP_CMAP, alpha=HEATMAP_ALPHA, vmin=0, vmax=1)
            ax_image.set_title(shorten(sample_id), fontsize=8)
            ax_cam.set_title(
                f"{record.label} | score {record.anomaly_score:.3f} | {record.verdict}",
                fontsize=8,
            )
            ax_image.set_axis_off()
            ax_cam.set_axis_off()
        name = save_figure(fig, out_dir, "heatmaps.png")
        lines += [
            "Each image beside its heatmap (red: where it looks anomalous): the memory "
            "bank's anomaly map where the category has one, else the detector's Grad-CAM.",
            "",
            f"![Heatmap examples]({name})",
            "",
            *_record_table([by_id[sid] for sid in known]),
        ]
    if unknown:
        lines += ["", "Maps for samples not in the records (not shown): "]
        lines[-1] += ", ".join(f"`{sid}`" for sid in unknown) + "."
    return [*lines, ""]


def _worst_section(
    out_dir: Path,
    *,
    heading: str,
    file_name: str,
    mistakes: Sequence[ImageRecord],
    n_worst: int,
    what: str,
    none: str,
) -> list[str]:
    lines = [f"## {heading}", ""]
    if not mistakes:
        return [*lines, none, ""]
    shown = list(mistakes[:n_worst])
    lines += [f"{len(mistakes)} in total; showing {len(shown)} ({what}).", ""]
    if not shown:
        return lines
    fig, axes = panels(len(shown), ncols=3, size=(2.8, 3.0))
    for ax, record in zip(axes, shown, strict=True):
        image = load_rgb(record.image_path)
        if image is None:
            missing_image(ax, record.image_path)
        else:
            ax.imshow(image)
        ax.set_title(
            f"{shorten(record.sample_id)}\n{record.label} | {record.anomaly_score:.3f}"
            f" | {record.decided_by}",
            fontsize=8,
        )
        ax.set_axis_off()
    name = save_figure(fig, out_dir, file_name)
    return [*lines, f"![{heading}]({name})", "", *_record_table(shown), ""]


def _learning_section(
    out_dir: Path, histories: Mapping[str, Sequence[Mapping[str, float]]]
) -> list[str]:
    lines = ["## Learning curves", ""]
    if not any(histories.values()):
        return [*lines, "No training history recorded.", ""]
    for index, key in enumerate(sorted(histories)):
        epochs = histories[key]
        lines += [f"### {key}", ""]
        if not epochs:
            lines += ["No epochs recorded.", ""]
            continue
        names = _numeric_keys(epochs)
        plotted = [n for n in names if n not in ("epoch", "lr") and not n.endswith("seconds")]
        losses = [n for n in plotted if "loss" in n]
        others = [n for n in plotted if "loss" not in n]
        fig = Figure(figsize=(10, 3.6), dpi=DPI, layout="constrained")
        for ax, group, title in zip(
            fig.subplots(1, 2), (losses, others), ("losses", "metrics"), strict=True
        ):
            for metric in group:
                xs, ys = _series(epochs, metric)
                ax.plot(xs, ys, marker="o", markersize=3, label=metric)
            if group:
                ax.legend(fontsize=7)
            else:
                ax.text(
                    0.5,
                    0.5,
                    f"no {title} recorded",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                )
            ax.set(xlabel="epoch", title=f"{key}: {title}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        name = save_figure(fig, out_dir, f"learning_{index:02d}_{slug(key)}.png")
        last = epochs[-1]
        summary = ", ".join(
            f"{n} {last[n]:.2e}" if n == "lr" else f"{n} {_fmt(last[n])}"
            for n in names
            if n != "epoch" and n in last
        )
        lines += [
            f"![Learning curves for {_alt(key)}]({name})",
            "",
            f"{len(epochs)} epoch{'s' if len(epochs) != 1 else ''}. Last epoch: {summary}.",
            "",
        ]
    return lines


@dataclass(frozen=True)
class _Trial:
    trial_id: str
    lr: float | None
    batch_size: int | None
    optimizer: str
    metric: str
    xs: list[float]
    ys: list[float]
    best_value: float | None
    is_best: bool


def _sweep_section(out_dir: Path, sweeps: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    lines = ["## Hyperparameter sweeps", ""]
    if not any(sweeps.values()):
        return [*lines, "No sweeps recorded.", ""]
    for index, key in enumerate(sorted(sweeps)):
        lines += [f"### {key}", ""]
        trials = sorted((_trial(t) for t in sweeps[key]), key=lambda t: t.trial_id)
        if not trials:
            lines += ["No trials recorded.", ""]
            continue
        metric = trials[0].metric
        fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
        ax_curve, ax_lr = fig.subplots(1, 2)
        _plot_trial_curves(ax_curve, trials, metric)
        skipped = _plot_lr_scatter(ax_lr, trials, metric)
        name = save_figure(fig, out_dir, f"sweep_{index:02d}_{slug(key)}.png")
        rows = [
            [
                md_cell(t.trial_id),
                f"{t.lr:.2e}" if t.lr is not None else "n/a",
                str(t.batch_size) if t.batch_size is not None else "n/a",
                md_cell(t.optimizer),
                str(len(t.ys)),
                _fmt(t.best_value),
                "**best**" if t.is_best else "",
            ]
            for t in trials
        ]
        lines += [
            f"![Sweep of {_alt(key)}]({name})",
            "",
            f"Left: {metric} per epoch for each trial (trials stopped early by the "
            "scheduler end sooner; the best trial in red). Right: each trial's best "
            f"{metric} against its learning rate; marker by optimizer, size by batch size.",
            "",
            *md_table(
                ["trial", "lr", "batch size", "optimizer", "epochs", f"best {metric}", "best"],
                rows,
            ),
            "",
        ]
        if skipped:
            lines += [
                "Not in the scatter (no positive lr or no metric): "
                + ", ".join(f"`{s}`" for s in skipped)
                + ".",
                "",
            ]
    return lines


def _trial(trial: Mapping[str, Any]) -> _Trial:
    config = trial.get("config") or {}
    metric = str(trial.get("metric", "metric"))
    points = [
        (float(e.get("epoch", i + 1)), float(e[metric]))
        for i, e in enumerate(trial.get("history") or [])
        if _is_number(e.get(metric))
    ]
    ys = [y for _, y in points]
    lower_is_better = "loss" in metric or "error" in metric
    best = (min(ys) if lower_is_better else max(ys)) if ys else None
    lr, batch = config.get("lr"), config.get("batch_size")
    return _Trial(
        trial_id=str(trial.get("trial_id", "")),
        lr=float(lr) if _is_number(lr) else None,
        batch_size=int(batch) if _is_number(batch) else None,
        optimizer=str(config.get("optimizer", "n/a")),
        metric=metric,
        xs=[x for x, _ in points],
        ys=ys,
        best_value=best,
        is_best=bool(trial.get("best", False)),
    )


def _plot_trial_curves(ax: Axes, trials: Sequence[_Trial], metric: str) -> None:
    labelled = len(trials) <= 10
    for trial in trials:
        if trial.is_best:
            ax.plot(
                trial.xs,
                trial.ys,
                color=_BEST_COLOR,
                linewidth=2.5,
                marker="o",
                markersize=3,
                zorder=3,
                label=f"{trial.trial_id} (best)",
            )
        else:
            ax.plot(
                trial.xs,
                trial.ys,
                linewidth=1,
                alpha=0.7,
                marker="o",
                markersize=2,
                label=trial.trial_id if labelled else None,
            )
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7)


def _plot_lr_scatter(ax: Axes, trials: Sequence[_Trial], metric: str) -> list[str]:
    placed = [t for t in trials if t.lr is not None and t.lr > 0 and t.best_value is not None]
    skipped = [t.trial_id for t in trials if t not in placed]
    batches = [t.batch_size for t in placed if t.batch_size is not None]
    low, high = (min(batches), max(batches)) if batches else (0, 0)

    def size(batch: int | None) -> float:
        if batch is None or high == low:
            return 60.0
        return 25.0 + 150.0 * (batch - low) / (high - low)

    optimizers = sorted({t.optimizer for t in placed})
    for i, optimizer in enumerate(optimizers):
        group = [t for t in placed if t.optimizer == optimizer]
        ax.scatter(
            [t.lr for t in group],
            [t.best_value for t in group],
            s=[size(t.batch_size) for t in group],
            marker=_MARKERS[i % len(_MARKERS)],
            edgecolors=[_BEST_COLOR if t.is_best else "black" for t in group],
            linewidths=[2.0 if t.is_best else 0.5 for t in group],
            alpha=0.8,
            label=optimizer,
        )
    if placed:
        ax.set_xscale("log")
        ax.legend(fontsize=7, title="optimizer", title_fontsize=7)
    ax.set(xlabel="learning rate", ylabel=f"best {metric}", title=f"best {metric} vs lr")
    ax.grid(alpha=0.3)
    return skipped


# ------------------------------------------------------------------------- helpers


def _confusion(records: Iterable[ImageRecord]) -> np.ndarray:
    """Counts (2, 2): rows truth good/defective, columns verdict ok/defective."""
    counts = np.zeros((2, 2), dtype=int)
    for record in records:
        counts[int(record.is_anomalous), int(record.predicted_anomalous)] += 1
    return counts


def _record_table(records: Sequence[ImageRecord]) -> list[str]:
    rows = [
        [
            md_cell(r.sample_id),
            md_cell(r.category),
            md_cell(r.label),
            _fmt(float(r.anomaly_score)),
            md_cell(r.decided_by),
        ]
        for r in records
    ]
    return md_table(["sample_id", "category", "label", "score", "decided_by"], rows)


def _resize_map(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
    resized = Image.fromarray(heatmap.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _numeric_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if _is_number(v) and k not in keys]
    return keys


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [
        (float(row["epoch"]) if _is_number(row.get("epoch")) else float(i + 1), float(row[key]))
        for i, row in enumerate(rows)
        if _is_number(row.get(key))
    ]
    return [x for x, _ in points], [y for _, y in points]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | np.generic)


def _fmt(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return md_cell(str(value))


def _alt(text: str) -> str:
    return re.sub(r"[\[\]]", "", text)
