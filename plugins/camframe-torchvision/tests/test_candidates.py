"""The best candidate for a box (docs/explaining-errors.md): RetinaNet's and FCOS's anchor (location), Faster
R-CNN's proposal. The best detection is the model's best-scoring candidate (NMS never drops the best box), so
for its own box and class, and for its box with no class, the candidate is that detection: same anchor or
proposal, score and box; and with ``conf`` above it, it is a missed object explained through it."""

from __future__ import annotations

import pytest
import torch
from test_detection import IMAGES, build

import camframe


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn", "fasterrcnn_resnet50_fpn"])
def test_candidate_of_the_best_detection_is_itself(name):
    model = build(name)
    ex = camframe.Explainer(model, guided=False)
    image = IMAGES[0]
    best = ex([image]).detections[0][0]
    result = ex([image], boxes=[0], regions=[[(best.box, best.class_id), (best.box, None)]])
    own, given, free = result.targets
    for t in (given, free):
        assert t.detection.index == best.index and t.class_id == best.class_id
        assert t.detection.score == pytest.approx(best.score, abs=1e-5)
        assert t.detection.box == pytest.approx(best.box, abs=1e-3)
        assert t.score == pytest.approx(own.score, abs=1e-4)  # the same logit, explained the same way
    assert torch.allclose(result.maps[1], result.maps[0], atol=1e-5)
    high = camframe.Explainer(model, guided=False, options={"conf": min(best.score + 1e-3, 1.0)})
    missed = high([image], labels=[[(best.box, best.class_id)]])
    (item,) = missed.outcomes[0]["missed"]
    assert item["candidate"]["model_index"] == best.index and item["why"]["below_threshold"] is True
