"""Grouping targets by their support windows (``camframe.engine.support``): no two targets of a group meet."""

from __future__ import annotations

import itertools

import numpy as np

from camframe.engine.support import clique, color, conflicts


def crown(k: int) -> list:
    """2k targets a_i, b_i meeting exactly when i != j (one layer per meeting pair): greedy colouring in the
    order a_1, b_1, a_2, b_2... needs k groups; the graph is bipartite (two suffice)."""
    windows: list[dict] = [{} for _ in range(2 * k)]
    for i, j in itertools.permutations(range(k), 2):
        windows[2 * i][f"l{i}{j}"] = windows[2 * j + 1][f"l{i}{j}"] = (0, 0, 0, 0)
    return windows


def test_conflicts_per_layer_and_unbounded():
    w = [{"a": (0, 4, 0, 4), "b": None}, {"a": (5, 9, 0, 4), "b": (0, 1, 0, 1)}, {"a": (4, 5, 4, 4)}, None]
    expected = np.array([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=bool)
    assert (conflicts(w) == expected).all()
    assert not conflicts([{"a": None}, {"a": (0, 0, 0, 0)}])[0, 1]  # a layer one target never reaches


def test_crown_in_two_groups_every_group_disjoint():
    windows = crown(5)
    rounds, bound = color([0] * len(windows), windows)
    assert len(rounds) == 2 and bound == 2 and sorted(i for r in rounds for i in r) == list(range(10))
    meet = conflicts(windows)
    assert not any(meet[i, j] for r in rounds for i, j in itertools.combinations(r, 2))


def test_unbounded_alone_and_images_share_rounds():
    windows = [None, {"a": (0, 0, 0, 0)}, {"a": (2, 2, 2, 2)}, {"a": (0, 0, 0, 0)}, {"a": (0, 0, 0, 0)}]
    rounds, bound = color([0, 0, 0, 1, 1], windows)
    assert bound == 2
    # image 0: the unbounded target alone, the two disjoint ones together; image 1: its two meet
    assert sorted(map(sorted, rounds)) == sorted([sorted([1, 2, 3]), [0, 4]]) or \
        sorted(map(sorted, rounds)) == sorted([[1, 2, 4], [0, 3]])
    assert color([0, 0], [None, None]) == ([[0], [1]], 2) and color([], []) == ([], 0)


def test_clique_bound():
    """Five targets all meeting need five passes; a sixth meeting only one of them does not raise it."""
    conflict = np.ones((6, 6), dtype=bool)
    conflict[5, 1:] = conflict[1:, 5] = False
    assert clique(conflict) == 5
    assert clique(np.eye(4, dtype=bool)) == 1
