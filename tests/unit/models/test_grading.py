"""Grading a graded category's parts: the cuts, the classifier's levels, the choice."""

import numpy as np
import pytest

from models.grading import CLASSIFIER, SCORE, Grading, fit_cuts, fit_grading, graded_levels

LEVELS = ("good", "defect_p33", "defect_p67", "defect_p100")
DEFECTIVE_FROM = 2  # as ELPV: a 1/3 cell is functional, defective from 2/3 on


def test_the_verdict_cut_is_one_of_the_grades_cuts():
    grading = Grading(LEVELS, DEFECTIVE_FROM, (0.3, 0.5, 0.8))
    graded = [grading.grade(s) for s in (0.0, 0.29, 0.3, 0.49, 0.5, 0.79, 0.8, 1.0)]
    assert graded == [
        "good",
        "good",
        "defect_p33",
        "defect_p33",
        "defect_p67",
        "defect_p67",
        "defect_p100",
        "defect_p100",
    ]
    assert Grading.from_dict(grading.to_dict()) == grading


def test_the_classifier_grades_only_among_the_levels_of_the_verdicts_side():
    grading = Grading(LEVELS, DEFECTIVE_FROM, (0.3, 0.5, 0.8), CLASSIFIER)
    scores = {"good": 0.1, "defect_p33": 0.15, "defect_p67": 0.05, "defect_p100": 0.7}
    # Judged ok: good or 1/3, whatever it says of the others; defective: 2/3 or 1.
    assert grading.grade(0.2, scores) == "defect_p33"
    assert grading.grade(0.6, {"good": 0.9, "defect_p67": 0.1}) == "defect_p67"
    # Where the classifier did not run, the cuts grade.
    assert grading.grade(0.9, None) == "defect_p100"


@pytest.mark.parametrize(
    "levels, defective_from, cuts, source",
    [
        (LEVELS[:2], 1, (0.5,), SCORE),  # two levels: a verdict, not a grade
        (LEVELS, 2, (0.3, 0.5), SCORE),  # one cut short
        (LEVELS, 2, (0.3, 0.6, 0.8), SCORE),  # the verdict's cut is missing
        (LEVELS, 2, (0.4, 0.5, 0.45), SCORE),  # decreasing
        (LEVELS, 0, (0.5, 0.6, 0.8), SCORE),  # nothing judged ok
        (LEVELS, 2, (0.3, 0.5, 0.8), "coin"),
    ],
)
def test_a_grading_that_cannot_grade_is_refused(levels, defective_from, cuts, source):
    with pytest.raises(ValueError):
        Grading(levels, defective_from, cuts, source)


def test_graded_levels_follow_severity_and_the_binary_split():
    parts = [
        ("defect_p100", 1.0, True),
        ("good", 0.0, False),
        ("defect_p33", 1 / 3, False),
        ("defect_p67", 2 / 3, True),
    ]
    assert graded_levels(parts) == (LEVELS, 2)
    assert graded_levels([("good", 0.0, False), ("crack", 1.0, True)]) is None  # two levels
    assert graded_levels([("good", None, False), ("crack", 1.0, True), ("dent", 0.5, True)]) is None
    # A defective level below a functional one is no grading.
    assert graded_levels([("a", 0.0, False), ("b", 0.5, True), ("c", 1.0, False)]) is None


def test_fitted_cuts_separate_levels_the_score_orders():
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2, 3], 30)
    centres = np.array([0.15, 0.4, 0.65, 0.9])
    scores = np.clip(centres[truth] + rng.normal(0, 0.02, truth.size), 0, 1)
    cuts = fit_cuts(scores, truth, 4, DEFECTIVE_FROM)
    assert 0.15 < cuts[0] < 0.4 and cuts[1] == 0.5 and 0.65 < cuts[2] < 0.9
    grading, figures = fit_grading(scores, [LEVELS[i] for i in truth], LEVELS, DEFECTIVE_FROM)
    assert grading.source == SCORE and figures["val_accuracy_score"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_fitted_cuts_grade_as_many_right_as_the_best_cuts_on_each_side(seed):
    # Every cut below 0.5 and every cut above (0, 0.5, 1 and the midpoints) tried:
    # none grades more right.
    rng = np.random.default_rng(seed)
    truth = rng.choice(4, size=80, p=[0.5, 0.2, 0.1, 0.2])
    scores = np.round(np.clip(0.15 + 0.25 * truth + rng.normal(0, 0.15, truth.size), 0, 1), 2)

    def candidates(values, low, high):
        values = np.unique(values)
        return np.r_[low, (values[:-1] + values[1:]) / 2, high]

    def right(cuts):
        return int((np.searchsorted(np.array(cuts), scores, side="right") == truth).sum())

    best = max(
        right([a, 0.5, b])
        for a in candidates(scores[scores < 0.5], 0.0, 0.5)
        for b in candidates(scores[scores >= 0.5], 0.5, 1.0)
    )
    cuts = fit_cuts(scores, truth, 4, DEFECTIVE_FROM)
    assert right(cuts) == best
    assert 0.0 <= cuts[0] <= cuts[1] == 0.5 <= cuts[2] <= 1.0


def test_ties_go_to_the_levels_farthest_from_the_verdict():
    # Every part judged ok scores 0.2 and every defective one 0.7, half of each
    # side at each of its levels: the cuts grade them good and certain.
    labels = ["good", "defect_p33", "defect_p67", "defect_p100"] * 2
    scores = [0.2, 0.2, 0.7, 0.7] * 2
    grading, _ = fit_grading(scores, labels, LEVELS, DEFECTIVE_FROM)
    assert [grading.grade(s) for s in (0.2, 0.7)] == ["good", "defect_p100"]


def test_the_classifier_is_chosen_only_where_it_grades_better():
    # The score puts every part of a side at one value: its cuts name one level a side.
    labels = ["good", "defect_p33", "defect_p67", "defect_p100"] * 4
    scores = [0.2, 0.2, 0.7, 0.7] * 4
    knows = [{label: 1.0} for label in labels]
    grading, figures = fit_grading(scores, labels, LEVELS, DEFECTIVE_FROM, knows)
    assert grading.source == CLASSIFIER
    assert figures["val_accuracy_classifier"] == 1.0 and figures["val_accuracy_score"] == 0.5
    # A classifier that is always wrong on each side is not chosen.
    swap = {"good": "defect_p33", "defect_p33": "good"}
    swap |= {"defect_p67": "defect_p100", "defect_p100": "defect_p67"}
    wrong = [{swap[label]: 1.0} for label in labels]
    grading, figures = fit_grading(scores, labels, LEVELS, DEFECTIVE_FROM, wrong)
    assert grading.source == SCORE and figures["chosen"] == SCORE


def test_a_label_outside_the_levels_is_refused():
    with pytest.raises(ValueError, match="not among the levels"):
        fit_grading([0.7], ["scratch"], LEVELS, DEFECTIVE_FROM)
