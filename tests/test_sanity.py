"""Sanity on a real pretrained MobileNetV2 and real photos: right classes, maps on the object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camframe import Explainer

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
BUSES = {"minibus", "police van", "trolleybus", "school bus", "passenger car", "minivan"}
# bus.jpg is 810 wide, 1080 high; the bus body (checked on an overlay) spans about x 40..800,
# y 240..720. The box below is that with a small margin: rows 230..730, columns 30..800.
BUS_BOX = (30, 230, 800, 730)  # x1, y1, x2, y2 (inclusive)


@pytest.fixture(scope="module")
def explainer(mobilenet):
    return Explainer(mobilenet, guided=False)


@pytest.fixture(scope="module")
def top1(explainer, images):
    result = explainer([images["chelsea"], images["bus"]])
    return {t.image: t for t in result.targets}


def test_default_layer_is_last_feature_map(explainer):
    assert list(explainer.layers) == ["features.18"]


def test_chelsea_is_a_cat(top1):
    assert top1[0].class_name in CATS, top1[0]


def test_bus_is_a_bus(top1):
    assert top1[1].class_name in BUSES, top1[1]


def test_scores_are_the_logits(explainer, images, top1):
    x, _ = explainer.preprocess([images["chelsea"], images["bus"]])
    with torch.no_grad():
        logits = explainer.model(x)
    for image, t in top1.items():
        assert t.class_id == int(logits[image].argmax())
        assert t.score == pytest.approx(float(logits[image, t.class_id]), rel=1e-4, abs=1e-4)


def test_minibus_map_lies_on_the_bus(explainer, images):
    result = explainer(images["bus"], target="minibus")
    assert [t.class_name for t in result.targets] == ["minibus"]
    (m,) = result.original()
    m = m.numpy()
    assert m.shape == (1080, 810)
    assert 0 <= m.min() and 0.99 <= m.max() <= 1  # resized from 224x224, so the peak may soften a little
    y, x = np.unravel_index(int(m.argmax()), m.shape)
    x1, y1, x2, y2 = BUS_BOX
    assert x1 <= x <= x2 and y1 <= y <= y2, f"argmax at x={x}, y={y}"
    inside = np.zeros(m.shape, bool)
    inside[y1:y2 + 1, x1:x2 + 1] = True
    # the box is 44% of the image but holds well over half the map's mass
    assert m[inside].sum() / m.sum() > 0.6
    assert m[inside].mean() > 2 * m[~inside].mean()


def test_cat_map_differs_from_bus_class_map(explainer, images):
    """Class-discriminative: the same image explained for two classes gives different maps."""
    result = explainer(images["chelsea"], target=["Egyptian cat", "minibus"])
    a, b = result.maps
    assert float((a - b).abs().max()) > 0.2
