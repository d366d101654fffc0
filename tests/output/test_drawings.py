"""``draw_detections``: mask outlines filled, keypoints and their skeleton, rotated boxes (any adapter's)."""

from __future__ import annotations

import cv2
import numpy as np

from camframe import Detection
from camframe.output.render import draw_boxes, draw_detections


def _image() -> np.ndarray:
    return np.full((200, 300, 3), 90, np.uint8)


def test_mask_filled_at_half_opacity_in_the_box_colour_only_inside():
    mask = [[[40, 40], [140, 40], [140, 160], [40, 160]]]  # a square outline, original pixels
    det = Detection((30, 30, 150, 170), 0, "thing", 0.9, extra={"mask": mask})
    drawn, plain = draw_detections(_image(), [det], [""]), draw_boxes(_image(), [det], [""])
    inside = np.zeros((200, 300), bool)
    inside[45:156, 45:136] = True
    np.testing.assert_array_equal(drawn[inside], np.round((90 + np.array([255, 56, 56])) / 2).astype(np.uint8)
                                  [None].repeat(inside.sum(), 0))  # palette colour 0, alpha 0.5
    outside = np.ones((200, 300), bool)
    outside[38:163, 38:143] = False
    np.testing.assert_array_equal(drawn[outside], plain[outside])


def test_keypoints_dots_and_skeleton_lines():
    points = [[50, 50, 0.9], [250, 50, 0.9], [150, 150, 0.1]]  # the third is not visible
    det = Detection((0, 0, 300, 200), 1, "pose", 0.9, extra={"keypoints": points})
    plain = draw_boxes(_image(), [det], [""])
    dots = draw_detections(_image(), [det], [""])
    drawn = draw_detections(_image(), [det], [""], skeleton=[(0, 1), (1, 2)])
    assert (dots[50, 50] != plain[50, 50]).any() and (dots[50, 250] != plain[50, 250]).any()
    assert (dots[150, 150] == plain[150, 150]).all()  # below the visibility threshold: not drawn
    assert (drawn[50, 150] != dots[50, 150]).any()  # the limb 0-1 between two visible points
    assert (drawn[100, 200] == dots[100, 200]).all()  # no limb to the invisible point


def test_rotated_box_drawn_as_its_polygon():
    polygon = [[150, 20], [280, 100], [150, 180], [20, 100]]  # a diamond
    det = Detection((20, 20, 280, 180), 2, "obb", 0.9, extra={"polygon": polygon})
    drawn = draw_detections(_image(), [det], [""])
    for (xa, ya), (xb, yb) in zip(polygon, polygon[1:] + polygon[:1]):
        assert (drawn[(ya + yb) // 2, (xa + xb) // 2] != 90).any()  # each side's middle
    assert (drawn[22, 22] == 90).all()  # the enclosing box's corner: no axis-aligned box
    reference = _image()
    cv2.polylines(reference, [np.array(polygon, np.int32)], True, (0, 194, 255), 1, cv2.LINE_AA)
    assert ((drawn != 90).any(2) | ~(reference != 90).any(2)).all()  # every pixel of the outline is drawn
