"""The report's defect-type section: confusions between types and the embedding map.

For each category with a defect classifier: the confusion matrix of true type
against the top-ranked type (truly defective images), the most confused pairs
with an example image of each, and a 2-D t-SNE map of the classifier's
embeddings of every test image, coloured by its label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
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
        lines += _embedding_map(out_dir, category, group)
    return lines


def _confusions(
    out_dir: Path,
    category: str,
    defects: Sequence[ImageRecord],
    n_pairs: int,
) -> list[str]:
    names = sorted({r.label for r in defects} | {r.defect_type for r in defects})
    index = {n: i for i, n in enumerate(names)}
    counts = np.zeros((len(names), len(names)), dtype=int)
    for record in defects:
        counts[index[record.label], index[record.defect_type]] += 1
    top1 = np.trace(counts) / counts.sum()
    side = max(3.2, 0.55 * len(names) + 1.5)
    fig = Figure(figsize=(side, side), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    draw_counts(ax, counts, names, names, fontsize=9)
    ax.set(xlabel="top-ranked type", ylabel="true type", title=f"{category}: top-1 {top1:.3f}")
    matrix = save_figure(fig, out_dir, f"types_confusion_{slug(category)}.png")
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
