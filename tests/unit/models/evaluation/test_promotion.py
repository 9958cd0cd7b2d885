"""The rule that promotes a retrained candidate only when it beats production."""

from __future__ import annotations

import pytest

from models.evaluation.promotion import judge, judged_figures


def test_each_stage_is_judged_on_the_figures_it_changes():
    assert judged_figures(["classifier"]) == ("defect_type_top1",)
    assert judged_figures(["memory-bank", "detector"]) == (
        "binary_accuracy",
        "image_auroc",
    )
    assert judged_figures(["classifier", "verifier"]) == (
        "binary_accuracy",
        "image_auroc",
        "defect_type_top1",
    )
    with pytest.raises(ValueError, match="localizer"):
        judged_figures(["localizer"])


def test_better_on_one_figure_and_worse_on_none_is_promoted():
    old = {"binary_accuracy": 0.80, "image_auroc": 0.90}
    verdict = judge(
        old, {"binary_accuracy": 0.85, "image_auroc": 0.90}, judged_figures(["detector"])
    )
    assert verdict.promoted and verdict.reason == "better on binary_accuracy, worse on none"
    assert verdict.figures["binary_accuracy"] == {"production": 0.80, "candidate": 0.85}


def test_worse_on_any_figure_or_a_tie_keeps_production():
    figures = judged_figures(["detector"])
    old = {"binary_accuracy": 0.80, "image_auroc": 0.90}
    traded = judge(old, {"binary_accuracy": 0.95, "image_auroc": 0.89}, figures)
    assert not traded.promoted and traded.reason == "worse on image_auroc"
    tie = judge(old, dict(old), figures)
    assert not tie.promoted and tie.reason.startswith("no better")


def test_a_figure_the_split_cannot_give_is_shown_not_judged():
    figures = judged_figures(["classifier", "detector"])
    old = {"binary_accuracy": 0.8, "image_auroc": 0.9}  # no defect was typed
    verdict = judge(old, {"binary_accuracy": 0.8, "image_auroc": 0.95}, figures)
    assert verdict.promoted
    assert verdict.figures["defect_type_top1"] == {"production": None, "candidate": None}
    nothing = judge({}, {}, judged_figures(["classifier"]))
    assert not nothing.promoted and "none of" in nothing.reason
