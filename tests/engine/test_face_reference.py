"""Omni-Zero's face operations against the reference operations, written here from insightface / InstantID.

Face crop: ``face_align.norm_crop`` = least-squares similarity onto ArcFace's template, then
``cv2.warpAffine`` with border 0. Detector input: ``SCRFD.detect``'s aspect-preserving
``cv2.resize`` into a top-left letterbox, ``(x - 127.5) / 128``. Keypoint image: ``draw_kps``.
Each must agree to within one grey level.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from diffserve.engine.models.omni_zero import face_analysis as fa


@pytest.fixture(scope="module")
def photo():
    rng = np.random.RandomState(3)
    y, x = np.mgrid[0:300, 0:220]
    img = np.stack([x, y * 0.8, (x + y) % 255], -1) + rng.randint(0, 60, size=(300, 220, 3))
    return img.clip(0, 255).astype(np.uint8)


KPS = np.array([[80.3, 110.7], [141.9, 108.2], [112.4, 150.6], [86.1, 190.3], [137.6, 188.9]], np.float32)


def _similarity_lstsq(src, dst):
    """Linear least squares for [a -b tx; b a ty] (a similarity without reflection)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows, float), np.array(rhs, float), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_face_crop_is_insightface_norm_crop(photo):
    ref = cv2.warpAffine(photo, _similarity_lstsq(KPS, fa.ARCFACE_TEMPLATE), (112, 112), borderValue=0.0)
    ours = fa.align_face(photo, KPS)
    assert ours.shape == (112, 112, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("shape", [(300, 220), (220, 300), (97, 641)])
def test_detector_input_is_scrfd_letterbox(shape):
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, size=(*shape, 3)).astype(np.uint8)
    h, w = shape
    if h / w > 1:
        nh, nw = 640, int(640 / (h / w))
    else:
        nw, nh = 640, int(640 * (h / w))
    canvas = np.zeros((640, 640, 3), np.uint8)
    canvas[:nh, :nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    ref = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
    blob, scale = fa.letterbox(img)
    assert blob.shape == (1, 3, 640, 640) and scale == pytest.approx(nh / h)
    assert np.abs(blob - ref).max() * 128 <= 1


def test_keypoint_image_is_draw_kps():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    out = np.zeros([300, 220, 3])
    for a, b in [[0, 2], [1, 2], [3, 2], [4, 2]]:
        x, y = KPS[[a, b], 0], KPS[[a, b], 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        poly = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), 4), int(angle), 0, 360, 1)
        out = cv2.fillConvexPoly(out.copy(), poly, colors[a])
    out = (out * 0.6).astype(np.uint8)
    for (x, y), color in zip(KPS, colors):
        out = cv2.circle(out.copy(), (int(x), int(y)), 10, color, -1)
    ours = fa.draw_keypoints(220, 300, KPS)
    assert ours.shape == out.shape and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - out.astype(int)).max() <= 1
