"""DETR's best candidate for a box is a query (docs/explaining-errors.md): for the best detection's own box and
class it is that detection's query; with ``conf`` above its score, a missed object explained through it."""

from __future__ import annotations

import camframe
import pytest
import torch
from test_detr import _bus, _explainer


@pytest.mark.parametrize("family", ["detr", "rtdetr"])
def test_candidate_of_the_best_detection_is_its_query(family):
    image = camframe.load_image(_bus())
    ex = _explainer(family, guided=False)
    best = ex([image]).detections[0][0]
    result = ex([image], boxes=[0], regions=[[(best.box, best.class_id), (best.box, None)]])
    own, given, free = result.targets
    for t in (given, free):
        assert t.detection.index == best.index and t.class_id == best.class_id
        assert t.detection.score == pytest.approx(best.score, abs=1e-5)
        assert t.detection.box == pytest.approx(best.box, abs=1e-2)
    assert torch.allclose(result.maps[1], result.maps[0], atol=1e-5)
    ex.adapter.configure(conf=min(best.score + 1e-4, 1.0))
    missed = ex([image], labels=[[(best.box, best.class_id)]])
    (item,) = missed.outcomes[0]["missed"]
    assert item["candidate"]["model_index"] == best.index and item["why"]["below_threshold"] is True
