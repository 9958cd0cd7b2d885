from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.evaluation.records import ImageRecord
from models.evaluation.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_REF = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")

# (sample_id, category, is_anomalous, score, verdict, decided_by)
# Two categories; false positives g05 (0.91), g04 (0.72), h03 (0.66);
# false negatives d05 (0.08), e02 (0.21), d04 (0.33). True positives d01/d02 and e01
# score higher than some false positives, so a table mixing them up would show.
CASES = [
    ("g01", "metal", False, 0.05, "ok", "detector"),
    ("g02", "metal", False, 0.12, "ok", "detector"),
    ("g03", "metal", False, 0.45, "ok", "verifier"),
    ("g04", "metal", False, 0.72, "defective", "verifier"),
    ("g05", "metal", False, 0.91, "defective", "detector"),
    ("d01", "metal", True, 0.97, "defective", "detector"),
    ("d02", "metal", True, 0.88, "defective", "detector"),
    ("d03", "metal", True, 0.55, "defective", "verifier"),
    ("d04", "metal", True, 0.33, "ok", "verifier"),
    ("d05", "metal", True, 0.08, "ok", "detector"),
    ("h01", "solar", False, 0.02, "ok", "detector"),
    ("h02", "solar", False, 0.30, "ok", "detector"),
    ("h03", "solar", False, 0.66, "defective", "verifier"),
    ("h04", "solar", False, 0.15, "ok", "detector"),
    ("e01", "solar", True, 0.99, "defective", "detector"),
    ("e02", "solar", True, 0.21, "ok", "verifier"),
    ("e03", "solar", True, 0.77, "defective", "detector"),
    ("e04", "solar", True, 0.60, "defective", "verifier"),
    ("e05", "solar", True, 0.81, "defective", "detector"),
    ("h05", "solar", False, 0.40, "ok", "verifier"),
]

METRICS = {
    "dataset": "toy",
    "n_images": 20,
    "image_auroc": 0.873456,
    "binary_accuracy": 0.7,
    "binary_f1": 0.712345,
    "balanced_accuracy": 0.701,
    "verifier_call_rate": 0.4,
    "band_accuracy_fused": 0.654321,
    "threshold": 0.5,
    "band_lo": 0.3,
    "band_hi": 0.7,
    "per_category": {
        "metal": {"image_auroc": 0.81, "binary_accuracy": 0.6, "n_images": 10},
        "solar": {"image_auroc": 0.93, "binary_accuracy": 0.8, "n_images": 10},
    },
}

HISTORIES = {
    "metal/detector": [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.2 / e,
            "val_auroc": 0.5 + e / 10,
            "lr": 1e-3,
            "epoch_seconds": 3.0,
        }
        for e in range(1, 5)
    ],
    "solar/verifier": [{"epoch": 1, "recon_loss": 0.3, "val_f1": 0.4}],
}

SWEEPS = {
    "metal/detector": [
        {
            "trial_id": "t2",
            "config": {"lr": 3e-4, "batch_size": 32, "optimizer": "sgd"},
            "metric": "val_auroc",
            "history": [{"epoch": 1, "val_auroc": 0.6}],
            "best": False,
        },
        {
            "trial_id": "t1",
            "config": {"lr": 1e-3, "batch_size": 16, "optimizer": "adamw"},
            "metric": "val_auroc",
            "history": [{"epoch": e, "val_auroc": 0.6 + 0.1 * e} for e in range(1, 4)],
            "best": True,
        },
        {
            "trial_id": "t3",
            "config": {"lr": 1e-2, "batch_size": 64, "optimizer": "adamw"},
            "metric": "val_auroc",
            "history": [{"epoch": 1, "val_auroc": 0.55}, {"epoch": 2, "val_auroc": 0.58}],
            "best": False,
        },
    ]
}


# The answers on "metal" (solar has no classifier): true type, top-ranked type
# after reranking, the classifier's own. Two scratches are taken for cracks, one
# crack for a scratch; reranking fixed d03 and broke d05.
TYPES = {
    "d01": ("crack", "crack", "crack"),
    "d02": ("crack", "scratch", "scratch"),
    "d03": ("scratch", "scratch", "crack"),
    "d04": ("scratch", "crack", "crack"),
    "d05": ("scratch", "crack", "scratch"),
}


def _records(tmp_path: Path, cases=CASES, typed: bool = False) -> list[ImageRecord]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for sample_id, category, anomalous, score, verdict, stage in cases:
        path = images / f"{sample_id}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        label, defect_type, by_classifier = TYPES.get(
            sample_id, ("crack" if anomalous else "good", "crack", "crack")
        )
        classified = typed and category == "metal"
        records.append(
            ImageRecord(
                sample_id=sample_id,
                image_path=str(path),
                category=category,
                label=label,
                is_anomalous=anomalous,
                anomaly_score=score,
                verdict=verdict,
                decided_by=stage,
                detector_probability=score,
                verifier_score=score if stage == "verifier" else None,
                defect_type=defect_type if classified else None,
                classifier_defect_type=by_classifier if classified else None,
                predicted_class=(by_classifier if anomalous else "good") if classified else None,
                embedding=tuple(rng.normal(size=8).tolist()) if classified else None,
                # "solar" is graded: good for a part judged ok, its label (or crack) above.
                grade=(
                    ("good" if verdict == "ok" else label if anomalous else "crack")
                    if typed and category == "solar"
                    else None
                ),
            )
        )
    return records


def _section(report: str, heading: str) -> str:
    start = report.index(f"## {heading}\n")
    end = report.find("\n## ", start + 1)
    return report[start : end if end != -1 else len(report)]


def _table_rows(section: str) -> list[list[str]]:
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    # One report read by many tests: each write costs about a second of plotting.
    tmp_path = tmp_path_factory.mktemp("full")
    records = _records(tmp_path, typed=True)
    path = write_report(
        tmp_path / "report",
        dataset="toy",
        records=records,
        metrics=METRICS,
        histories=HISTORIES,
        sweeps=SWEEPS,
        heatmaps={
            "d01": np.linspace(0, 1, 7 * 9).reshape(7, 9),
            "g05": np.zeros((64, 64)),
        },
        n_worst=2,
    )
    return path, path.read_text()


def test_every_reference_is_a_png_and_every_png_is_referenced(full_report):
    path, text = full_report
    assert path.name == "report.md" and path.is_file()
    referenced = IMAGE_REF.findall(text)
    assert referenced, "the report references no image"
    for name in referenced:
        assert "/" not in name, f"{name} is not a file name relative to the report"
        target = path.parent / name
        assert target.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(target) as image:
            image.verify()
    on_disk = sorted(p.name for p in path.parent.glob("*.png"))
    assert on_disk == sorted(set(referenced))
    # One learning-curve and one sweep figure per key, plus the fixed figures.
    assert sum(n.startswith("learning_") for n in on_disk) == 2
    assert sum(n.startswith("sweep_") for n in on_disk) == 1
    for fixed in ("roc_pr", "confusion", "scores", "heatmaps", "worst_fp", "worst_fn"):
        assert f"{fixed}.png" in on_disk


def test_sections_come_in_order(full_report):
    _, text = full_report
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "Summary metrics",
        "Per category",
        "ROC and precision-recall curves",
        "Confusion matrix",
        "Which stage decided",
        "Defect types",
        "Grades",
        "Score distributions",
        "Heatmap examples",
        "Worst false positives",
        "Worst false negatives",
        "Learning curves",
        "Hyperparameter sweeps",
    ]
    assert text.startswith("# Evaluation report: toy\n")


def test_defect_types_show_confusions_and_the_embedding_map(full_report):
    _, text = full_report
    section = _section(text, "Defect types")
    assert "### metal" in section and "### solar" not in section
    assert "Top-1 0.400 over 5 defective images." in section
    rows = _table_rows(section)
    assert rows[:2] == [["scratch", "crack", "2"], ["crack", "scratch", "1"]]
    # What reranking changed: d03 fixed, d05 broken, counts per confusion.
    assert "top-1 0.400 (classifier alone) → 0.400 (reranked); 1 image(s) fixed, 1 broken" in (
        section
    )
    assert ["crack → scratch", "1", "1"] in rows and ["scratch → crack", "2", "2"] in rows
    # Every image's most probable class, good parts included.
    assert "Every test image's most probable class: accuracy 0.700 over 10 images." in section
    for figure in (
        "types_confusion_metal",
        "types_confused_metal",
        "types_embedding_metal",
        "classes_confusion_metal",
    ):
        assert f"({figure}.png)" in section


def test_grades_show_their_confusion_per_graded_category(full_report):
    _, text = full_report
    section = _section(text, "Grades")
    assert "### solar" in section and "### metal" not in section
    # h03 (good, judged defective) and e02 (a defect judged ok) are graded wrong.
    assert "Graded right: 0.800 of 10 images." in section
    assert "(grades_confusion_solar.png)" in section


def test_worst_false_positives_by_descending_score(full_report):
    _, text = full_report
    section = _section(text, "Worst false positives")
    rows = _table_rows(section)
    # n_worst=2 of the three false positives, never a true positive.
    assert [r[0] for r in rows] == ["g05", "g04"]
    assert [r[3] for r in rows] == ["0.9100", "0.7200"]
    assert "3 in total" in section


def test_worst_false_negatives_by_ascending_score(full_report):
    _, text = full_report
    rows = _table_rows(_section(text, "Worst false negatives"))
    assert [r[0] for r in rows] == ["d05", "e02"]
    assert [r[1] for r in rows] == ["metal", "solar"]
    assert [r[4] for r in rows] == ["detector", "verifier"]


def test_all_mistakes_listed_when_n_worst_is_large(tmp_path):
    path = write_report(
        tmp_path / "r", dataset="toy", records=_records(tmp_path), metrics=METRICS, n_worst=50
    )
    text = path.read_text()
    fp = [r[0] for r in _table_rows(_section(text, "Worst false positives"))]
    fn = [r[0] for r in _table_rows(_section(text, "Worst false negatives"))]
    assert fp == ["g05", "g04", "h03"]
    assert fn == ["d05", "e02", "d04"]


def test_metrics_tables(full_report):
    _, text = full_report
    summary = {r[0]: r[1] for r in _table_rows(_section(text, "Summary metrics"))}
    assert summary["image_auroc"] == "0.8735"
    assert summary["binary_f1"] == "0.7123"
    assert summary["band_accuracy_fused"] == "0.6543"  # not a hard-coded key
    assert summary["n_images"] == "20"
    assert summary["dataset"] == "toy"
    assert "per_category" not in summary

    per_category = _table_rows(_section(text, "Per category"))
    assert [r[0] for r in per_category] == ["metal", "solar"]
    assert per_category[1] == ["solar", "0.9300", "0.8000", "10"]


def test_confusion_and_stage_counts(full_report):
    _, text = full_report
    confusion = _table_rows(_section(text, "Confusion matrix"))
    assert confusion == [["good", "7", "3"], ["defective", "3", "7"]]

    stages = {r[0]: r for r in _table_rows(_section(text, "Which stage decided"))}
    # detector: 12 images, 10 right (g05 and d05 wrong); verifier: 8 images, 4 right.
    assert stages["detector"][1:] == ["12", "0.6000", "10", "0.8333"]
    assert stages["verifier"][1:] == ["8", "0.4000", "4", "0.5000"]


def test_roc_table_has_each_category(full_report):
    _, text = full_report
    rows = {r[0]: r for r in _table_rows(_section(text, "ROC and precision-recall curves"))}
    assert set(rows) == {"overall", "metal", "solar"}
    assert rows["overall"][1:3] == ["20", "10"]
    assert "AUROC" in text and "skipped" not in _section(text, "ROC and precision-recall curves")


def test_learning_and_sweep_sections(full_report):
    _, text = full_report
    learning = _section(text, "Learning curves")
    assert "### metal/detector" in learning and "### solar/verifier" in learning
    assert "4 epochs." in learning
    assert "1 epoch." in learning

    trials = _table_rows(_section(text, "Hyperparameter sweeps"))
    assert [r[0] for r in trials] == ["t1", "t2", "t3"]
    assert [r[4] for r in trials] == ["3", "1", "2"]  # epochs run differ (early stopping)
    assert [r[5] for r in trials] == ["0.9000", "0.6000", "0.5800"]
    assert [r[6] for r in trials] == ["**best**", "", ""]
    assert trials[0][1:4] == ["1.00e-03", "16", "adamw"]


def test_heatmaps_list_the_samples(full_report):
    _, text = full_report
    rows = _table_rows(_section(text, "Heatmap examples"))
    assert [r[0] for r in rows] == ["d01", "g05"]


def test_no_false_positives_says_none(tmp_path):
    cases = [c for c in CASES if not (not c[2] and c[4] == "defective")]
    path = write_report(
        tmp_path / "r", dataset="toy", records=_records(tmp_path, cases), metrics={}
    )
    text = path.read_text()
    section = _section(text, "Worst false positives")
    assert "none" in section.lower()
    assert _table_rows(section) == []
    assert not (path.parent / "worst_fp.png").exists()
    assert (path.parent / "worst_fn.png").exists()
    assert "No training history recorded." in text
    assert "No heatmaps supplied." in text


def test_empty_records_raise(tmp_path):
    with pytest.raises(ValueError, match="at least one ImageRecord"):
        write_report(tmp_path / "r", dataset="toy", records=[], metrics=METRICS)
    assert not (tmp_path / "r" / "report.md").exists()


def test_single_class_category_is_skipped_with_a_note(tmp_path):
    # "solar" only has good parts: its ROC is undefined, the rest still renders.
    cases = [c for c in CASES if c[1] == "metal" or not c[2]]
    path = write_report(
        tmp_path / "r", dataset="toy", records=_records(tmp_path, cases), metrics=METRICS
    )
    section = _section(path.read_text(), "ROC and precision-recall curves")
    assert "`solar` skipped" in section
    assert {r[0] for r in _table_rows(section)} == {"overall", "metal"}
    assert (path.parent / "roc_pr.png").exists()


def test_single_class_overall_writes_no_curves(tmp_path):
    cases = [c for c in CASES if not c[2]]
    path = write_report(
        tmp_path / "r", dataset="toy", records=_records(tmp_path, cases), metrics={}
    )
    section = _section(path.read_text(), "ROC and precision-recall curves")
    assert "skipped" in section
    assert not (path.parent / "roc_pr.png").exists()
    assert "None: no defective part was called ok." in path.read_text()


def test_rerun_removes_stale_figures(tmp_path):
    records = _records(tmp_path)
    out = tmp_path / "r"
    write_report(out, dataset="toy", records=records, metrics=METRICS, histories=HISTORIES)
    path = write_report(out, dataset="toy", records=records, metrics=METRICS)
    referenced = set(IMAGE_REF.findall(path.read_text()))
    assert {p.name for p in out.glob("*.png")} == referenced
    assert not any(name.startswith("learning_") for name in referenced)


def test_missing_image_does_not_crash(tmp_path):
    records = _records(tmp_path)
    (tmp_path / "images" / "g05.png").unlink()
    path = write_report(
        tmp_path / "r",
        dataset="toy",
        records=records,
        metrics=METRICS,
        heatmaps={"g05": np.ones((4, 4))},
    )
    assert (path.parent / "heatmaps.png").exists()


def test_bad_heatmap_and_duplicate_ids_raise(tmp_path):
    records = _records(tmp_path)
    with pytest.raises(ValueError, match="2-D"):
        write_report(
            tmp_path / "r",
            dataset="toy",
            records=records,
            metrics=METRICS,
            heatmaps={"g01": np.zeros((2, 3, 4))},
        )
    with pytest.raises(ValueError, match="more than once"):
        write_report(tmp_path / "r", dataset="toy", records=[*records, records[0]], metrics=METRICS)


def test_leaves_no_pyplot_figures(full_report):
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []


def test_localizer_figures_get_their_own_section(tmp_path):
    from models.metrics.detection import ImageBoxes, detection_metrics

    truth = [
        ImageBoxes(np.array([[10.0, 10.0, 40.0, 40.0]]), ["crack"]),
        ImageBoxes(np.array([[5.0, 5.0, 200.0, 200.0]]), ["scratch"]),
    ]
    found = [
        ImageBoxes(np.array([[10.0, 10.0, 40.0, 40.0]]), ["crack"], np.array([0.9])),
        ImageBoxes(np.array([[5.0, 5.0, 20.0, 20.0]]), ["scratch"], np.array([0.8])),
    ]
    localizer = detection_metrics(truth, found, ["crack", "scratch"])
    path = write_report(
        tmp_path / "report",
        dataset="toy",
        records=_records(tmp_path),
        metrics=METRICS | {"localizer": localizer},
    )
    section = _section(path.read_text(), "Defect boxes (localizer)")
    assert "mAP@0.5 0.5000" in section and "precision 0.5000 and recall 0.5000" in section
    rows = _table_rows(section)
    assert rows[0][:3] == ["crack", "1.0000", "1.0000"]
    assert rows[1][:2] == ["scratch", "0.0000"]
    assert ["small", "1", "1.0000", "1.0000"] in rows and ["large", "1", "0.0000", "0.0000"] in rows
