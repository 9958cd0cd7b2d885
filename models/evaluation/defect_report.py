"""The report's defect-type section: confusions between types and the embedding map.

For each category with a defect classifier: the confusion matrix of true type
against the top-ranked type (truly defective images), the most confused pairs
with an example image of each, what reranking changed, the confusion of every
image's most probable class (ELPV: the four levels), and a 2-D t-SNE map of the classifier's
embeddings of every test image, coloured by its label.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.manifold import TSNE

from models.evaluation.figures import (
    DPI,
    draw_counts,
    load_rgb,
    md_cell,
    md_table,
    missing_image,
    panels,
    save_figure,
    slug,
)
from models.evaluation.records import ImageRecord


def defect_type_section(
    out_dir: Path, records: Sequence[ImageRecord], n_pairs: int = 6
) -> list[str]:
    """Markdown lines (and figures written to ``out_dir``) about defect typing.

    Args:
        out_dir: where the figures go.
        records: every test record; those without a classifier's answer are ignored.
        n_pairs: the most confused pairs listed per category.
    """
    typed = [r for r in records if r.defect_type is not None]
    lines = ["## Defect types", ""]
    if not typed:
        return [*lines, "No category has a defect classifier.", ""]
    lines += [
        "The classifier's top-ranked defect type against the true one, on every truly "
        "defective test image (caught by the detector or not).",
        "",
    ]
    for category in sorted({r.category for r in typed}):
        group = [r for r in typed if r.category == category]
        defects = [r for r in group if r.is_anomalous]
        lines += [f"### {category}", ""]
        if defects:
            lines += _confusions(out_dir, category, defects, n_pairs)
            lines += _reranker_changes(defects)
        lines += _class_confusion(out_dir, category, group)
        lines += _embedding_map(out_dir, category, group)
    return lines


def _confusions(
    out_dir: Path,
    category: str,
    defects: Sequence[ImageRecord],
    n_pairs: int,
) -> list[str]:
    pairs = [(r.label, r.defect_type) for r in defects]
    top1, matrix = _count_matrix(
        out_dir,
        f"types_confusion_{slug(category)}.png",
        pairs,
        ("top-ranked type", "true type"),
        lambda share: f"{category}: top-1 {share:.3f}",
    )
    lines = [
        f"Top-1 {top1:.3f} over {len(defects)} defective images.",
        "",
        f"![Defect-type confusion matrix of {category}]({matrix})",
        "",
    ]
    pairs = Counter((r.label, r.defect_type) for r in defects if r.label != r.defect_type)
    if not pairs:
        return [*lines, "No defect was given another type.", ""]
    worst = pairs.most_common(n_pairs)
    lines += md_table(
        ["true type", "ranked first", "images"],
        [[md_cell(true), md_cell(found), str(count)] for (true, found), count in worst],
    )
    examples = [next(r for r in defects if (r.label, r.defect_type) == pair) for pair, _ in worst]
    fig, axes = panels(len(examples), ncols=len(examples), size=(2.2, 2.5))
    for ax, record in zip(axes, examples, strict=True):
        image = load_rgb(record.image_path)
        if image is None:
            missing_image(ax, record.image_path)
        else:
            ax.imshow(image)
        ax.set_title(f"{record.label}\n→ {record.defect_type}", fontsize=8)
        ax.set_axis_off()
    gallery = save_figure(fig, out_dir, f"types_confused_{slug(category)}.png")
    return [*lines, "", f"![An example of each confused pair in {category}]({gallery})", ""]


def _class_confusion(out_dir: Path, category: str, group: Sequence[ImageRecord]) -> list[str]:
    """Every image's most probable class (good and graded levels included) against its label."""
    graded = [r for r in group if r.predicted_class is not None]
    if not graded:
        return []
    accuracy, name = _count_matrix(
        out_dir,
        f"classes_confusion_{slug(category)}.png",
        [(r.label, r.predicted_class) for r in graded],
        ("most probable class", "true class"),
        lambda share: f"{category}\nevery image: accuracy {share:.3f}",
    )
    return [
        f"Every test image's most probable class: accuracy {accuracy:.3f} over "
        f"{len(graded)} images.",
        "",
        f"![Class confusion matrix of {category}]({name})",
        "",
    ]


def grade_section(out_dir: Path, records: Sequence[ImageRecord]) -> list[str]:
    """Markdown lines (and a figure per category) about the grades the service answered.

    Empty when no category is graded (:mod:`models.grading`).
    """
    graded = [r for r in records if r.grade is not None]
    if not graded:
        return []
    lines = [
        "## Grades",
        "",
        "The level each test image was graded at, as the service answers it (among the "
        "levels on its verdict's side, from the category's fitted cuts on the final score or "
        "its classifier, whichever graded its validation split better), against its label.",
        "",
    ]
    for category in sorted({r.category for r in graded}):
        group = [r for r in graded if r.category == category]
        accuracy, name = _count_matrix(
            out_dir,
            f"grades_confusion_{slug(category)}.png",
            [(r.label, r.grade) for r in group],  # type: ignore[misc]
            ("grade answered", "true level"),
            lambda share, category=category: f"{category}\ngrades: accuracy {share:.3f}",
        )
        lines += [
            f"### {category}",
            "",
            f"Graded right: {accuracy:.3f} of {len(group)} images.",
            "",
            f"![Grade confusion matrix of {category}]({name})",
            "",
        ]
    return lines


def _natural(name: str) -> tuple[bool, list[int | str]]:
    """Sort key: ``good`` first, then by name with numbers compared as numbers (p33 < p100)."""
    return name != "good", [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _count_matrix(
    out_dir: Path,
    filename: str,
    pairs: Sequence[tuple[str, str]],
    axis_labels: tuple[str, str],
    title: Callable[[float], str],
) -> tuple[float, str]:
    """Draw (true, predicted) counts as a matrix; returns the diagonal share and the file."""
    names = sorted({n for pair in pairs for n in pair}, key=_natural)
    index = {n: i for i, n in enumerate(names)}
    counts = np.zeros((len(names), len(names)), dtype=int)
    for truth, guess in pairs:
        counts[index[truth], index[guess]] += 1
    share = float(np.trace(counts) / counts.sum())
    side = max(4.2, 0.6 * len(names) + 2.0)
    fig = Figure(figsize=(side, side), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    draw_counts(ax, counts, names, names, fontsize=9)
    ax.set(xlabel=axis_labels[0], ylabel=axis_labels[1], title=title(share))
    return share, save_figure(fig, out_dir, filename)


def _reranker_changes(defects: Sequence[ImageRecord]) -> list[str]:
    """What reranking did to the classifier's answers: fixed, broken, pairs before and after."""
    both = [r for r in defects if r.classifier_defect_type is not None]
    if not both or all(r.defect_type == r.classifier_defect_type for r in both):
        return []
    before = sum(r.classifier_defect_type == r.label for r in both) / len(both)
    after = sum(r.defect_type == r.label for r in both) / len(both)
    fixed = sum(r.classifier_defect_type != r.label and r.defect_type == r.label for r in both)
    broken = sum(r.classifier_defect_type == r.label and r.defect_type != r.label for r in both)
    pairs_before = Counter(
        (r.label, r.classifier_defect_type) for r in both if r.classifier_defect_type != r.label
    )
    pairs_after = Counter((r.label, r.defect_type) for r in both if r.defect_type != r.label)
    rows = [
        [
            md_cell(f"{true} → {found}"),
            str(pairs_before[true, found]),
            str(pairs_after[true, found]),
        ]
        for true, found in sorted(set(pairs_before) | set(pairs_after))
    ]
    return [
        f"Reranking: top-1 {before:.3f} (classifier alone) → {after:.3f} (reranked); "
        f"{fixed} image(s) fixed, {broken} broken.",
        "",
        *md_table(["confusion", "classifier alone", "reranked"], rows),
        "",
    ]


def _embedding_map(
    out_dir: Path,
    category: str,
    group: Sequence[ImageRecord],
) -> list[str]:
    embedded = [r for r in group if r.embedding is not None]
    if len(embedded) < 5:
        return ["Too few embedded images for a map.", ""]
    points = TSNE(
        n_components=2,
        perplexity=min(30.0, (len(embedded) - 1) / 3),
        init="pca",
        random_state=0,
    ).fit_transform(np.asarray([r.embedding for r in embedded], dtype=np.float32))
    fig = Figure(figsize=(5.5, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for label in sorted({r.label for r in embedded}):
        mask = np.array([r.label == label for r in embedded])
        ax.scatter(points[mask, 0], points[mask, 1], s=14, label=label, alpha=0.8)
    ax.legend(fontsize=7, markerscale=1.2)
    ax.set(title=f"{category}: classifier embeddings (t-SNE)", xticks=[], yticks=[])
    name = save_figure(fig, out_dir, f"types_embedding_{slug(category)}.png")
    return [
        f"![t-SNE map of the classifier's embeddings of {category}'s test images]({name})",
        "",
    ]
