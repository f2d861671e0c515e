"""Each metric against cases computed by hand."""

import pytest

from megapairs_ray.train.metrics import (
    average_precision_at_k,
    circo_map_at_k,
    cirr_metrics,
    genecis_recall_at_1,
    genecis_recall_at_k,
    recall_at_k,
)


def test_average_precision_by_hand():
    # Relevant at ranks 1 and 3 of 2 ground truths: (1/1 + 2/3) / min(5, 2) = 0.8333
    assert average_precision_at_k(["a", "x", "b", "y", "z"], {"a", "b"}, 5) == pytest.approx(
        (1 + 2 / 3) / 2)
    # Only one of three ground truths in the top 2, at rank 2: (1/2) / min(2, 3) = 0.25
    assert average_precision_at_k(["x", "a", "b"], {"a", "b", "c"}, 2) == pytest.approx(0.25)
    assert average_precision_at_k(["x", "y"], {"a"}, 2) == 0.0
    with pytest.raises(ValueError):
        average_precision_at_k(["x"], set(), 1)


def test_circo_map_averages_queries_in_percent():
    out = circo_map_at_k([["a", "x"], ["y", "b"]], [{"a"}, {"b"}], ks=(1, 2))
    assert out["mAP@1"] == pytest.approx(50.0)  # (1 + 0) / 2
    assert out["mAP@2"] == pytest.approx(75.0)  # (1 + 1/2) / 2


def test_recall_at_k():
    out = recall_at_k([["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"]], ["a", "a", "a"],
                      (1, 2, 3))
    assert out == {"R@1": pytest.approx(100 / 3), "R@2": pytest.approx(100 / 3),
                   "R@3": pytest.approx(100.0)}


def test_cirr_drops_the_reference_and_ranks_within_the_subset():
    # The reference "r" ranks first: it is removed, so the target "t" becomes rank 1.
    ranking = ["r", "t", "u", "v", "w"]
    out = cirr_metrics([ranking], ["t"], subsets=[["r", "v", "t"]], references=["r"])
    assert out["R@1"] == 100.0
    assert out["R_subset@1"] == 100.0
    # Subset {v, t} (reference excluded): ranked v? no — global order keeps t before v.
    ranking2 = ["u", "v", "r", "t"]
    out2 = cirr_metrics([ranking2], ["t"], subsets=[["r", "v", "t"]], references=["r"])
    assert out2["R@1"] == 0.0 and out2["R@5"] == 100.0
    assert out2["R_subset@1"] == 0.0 and out2["R_subset@2"] == 100.0


def test_genecis_recall_at_1():
    assert genecis_recall_at_1([[0.1, 0.9, 0.3], [0.5, 0.2, 0.1]], [1, 2]) == 50.0


def test_genecis_recall_at_k_by_hand():
    # Positive ranks: 1, 3 (two distractors above), 2.
    out = genecis_recall_at_k([[0.9, 0.1, 0.2], [0.1, 0.5, 0.3], [0.4, 0.6, 0.2]], [0, 0, 0])
    assert out == {"R@1": pytest.approx(100 / 3), "R@2": pytest.approx(200 / 3),
                   "R@3": pytest.approx(100.0)}
    assert genecis_recall_at_k([[0.2, 0.7]], [1], ks=(1,)) == {"R@1": 100.0}


def test_genecis_ties_with_the_positive_are_misses():
    # GeneCIS puts the positive first: an argmax would call each of these a hit.
    assert genecis_recall_at_1([[0.5, 0.5, 0.1]], [0]) == 0.0
    assert genecis_recall_at_k([[0.5, 0.5, 0.1]], [0]) == {"R@1": 0.0, "R@2": 100.0,
                                                           "R@3": 100.0}
    # A constant scorer ties everything: the positive ranks last, never within the top 3.
    assert genecis_recall_at_k([[0.3] * 15], [0]) == {"R@1": 0.0, "R@2": 0.0, "R@3": 0.0}
    # A tie among distractors below the positive does not hurt it.
    assert genecis_recall_at_1([[0.9, 0.2, 0.2]], [0]) == 100.0
    with pytest.raises(ValueError):
        genecis_recall_at_k([[0.1]], [0, 0])
