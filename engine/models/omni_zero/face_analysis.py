"""Face analysis for Omni-Zero: detection (SCRFD), five keypoints, recognition embedding (ArcFace).

The networks are the ONNX files of an insightface model pack (antelopev2: ``scrfd_10g_bnkps.onnx``
and ``glintr100.onnx``) and run as the ``face_detector`` and ``face_recognizer`` components; this
module owns everything around them, in numpy and opencv (cv2, whose pixel conventions the
reference relies on: insightface's ``scrfd.detect``/``face_align.norm_crop`` and InstantID's
``draw_kps`` are reproduced operation for operation): letterboxing to the detector's square
input, decoding the anchor-free SCRFD outputs (three strides, two anchors per cell, sigmoid
scores, distances to the box sides and keypoint offsets in stride units), non-maximum
suppression, similarity alignment of a face to ArcFace's 112x112 template, and the keypoint
drawing InstantID's IdentityNet is conditioned on. The constants are insightface's defaults as
used by the reference (``FaceAnalysis.prepare(det_size=(640, 640))``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from diffserve.engine.catalog import InvalidRequest

DET_SIZE = 640
"""Square detector input (``det_size=(640, 640)``); images are letterboxed into it."""
DET_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4
STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2
FACE_SIZE = 112
"""ArcFace input side."""

# ArcFace's five-point template in a 112x112 crop: eyes, nose tip, mouth corners (x, y).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)

# InstantID's keypoint drawing: a colour per keypoint, limbs from each point to the nose.
KEYPOINT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KEYPOINT_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
LIMB_HALF_WIDTH = 4
KEYPOINT_RADIUS = 10


class NoFaceDetected(InvalidRequest):
    """An image that must show a face does not (the API answers 400)."""


@dataclass(frozen=True)
class Face:
    box: np.ndarray
    """[x1, y1, x2, y2] in the analysed image's pixels."""
    score: float
    keypoints: np.ndarray
    """[5, 2]: left eye, right eye, nose, left and right mouth corner (x, y)."""

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0))


# -- model pack --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FaceModelFiles:
    detector: Path
    recognizer: Path


def onnx_files(directory: str | Path) -> list[Path]:
    """Every ``.onnx`` file under ``directory`` (links followed), in path order."""
    import os

    found = []
    for parent, _, names in os.walk(directory, followlinks=True):
        found += [Path(parent) / n for n in names if n.endswith(".onnx")]
    return sorted(found)


def find_face_models(directory: str | Path) -> FaceModelFiles:
    """Pick the detector and the recognizer in an insightface model pack as insightface does.

    A detector has at least five outputs (scores, boxes, keypoints per stride); a recognizer takes
    a 112x112 face and returns one embedding. Other models of the pack (landmarks, gender/age)
    are ignored. The first file of each kind in name order wins. The directory is searched
    recursively, so antelopev2 as unzipped (``models/antelopev2/*.onnx``, the layout insightface
    itself reads) is found from any folder above it.
    """
    import onnx

    directory = Path(directory)
    files = onnx_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory} holds no .onnx face models (expected an antelopev2-style pack)")
    detector = recognizer = None
    for path in files:
        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim] if inputs else []
        if len(graph.output) >= 5 and detector is None:
            detector = path
        elif len(graph.output) == 1 and dims[-2:] == [FACE_SIZE, FACE_SIZE] and recognizer is None:
            recognizer = path
    missing = [k for k, v in (("detector", detector), ("recognizer", recognizer)) if v is None]
    if missing:
        raise FileNotFoundError(f"{directory}: no face {' or '.join(missing)} model among "
                                f"{', '.join(p.name for p in files)}")
    return FaceModelFiles(detector=detector, recognizer=recognizer)


# -- detection -----------------------------------------------------------------------------------------

def letterbox(image: np.ndarray, size: int = DET_SIZE) -> tuple[np.ndarray, float]:
    """RGB uint8 [H, W, 3] -> detector input [1, 3, size, size] and the image's scale factor.

    As insightface's ``SCRFD.detect``: the image is resized with ``cv2.resize`` (INTER_LINEAR) to
    fit the square keeping its aspect ratio, placed at the top-left corner of a black uint8
    canvas, and normalised as ``cv2.dnn.blobFromImage`` with mean 127.5 and std 128 does. (The
    reference hands insightface BGR and ``blobFromImage`` swaps it back to RGB: ours stays RGB.)
    """
    height, width = image.shape[:2]
    im_ratio = float(height) / width
    if im_ratio > 1.0:
        new_h = size
        new_w = int(new_h / im_ratio)
    else:
        new_w = size
        new_h = int(new_w * im_ratio)
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    resized = cv2.resize(np.ascontiguousarray(image), (new_w, new_h))
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    blob = cv2.dnn.blobFromImage(canvas, 1.0 / 128.0, (size, size), (127.5, 127.5, 127.5), swapRB=False)
    return np.ascontiguousarray(blob, dtype=np.float32), float(new_h) / height


def anchor_centers(height: int, width: int, stride: int) -> np.ndarray:
    """[(height/stride) * (width/stride) * anchors, 2] cell centres (x, y), row-major, anchors adjacent."""
    rows, cols = height // stride, width // stride
    ys, xs = np.mgrid[:rows, :cols]
    centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centers, ANCHORS_PER_CELL, axis=0)


def decode_detections(outputs: list[np.ndarray], input_size: int, scale: float,
                      threshold: float = DET_THRESHOLD, nms_threshold: float = NMS_THRESHOLD) -> list[Face]:
    """SCRFD outputs (scores, boxes, keypoints for each of the three strides) -> faces, best first."""
    levels = len(STRIDES)
    if len(outputs) != 3 * levels:
        raise ValueError(f"expected {3 * levels} detector outputs (scores, boxes, keypoints per stride), "
                         f"got {len(outputs)}")
    scores, boxes, points = [], [], []
    for i, stride in enumerate(STRIDES):
        # Some exports carry a leading batch axis of one.
        score = np.asarray(outputs[i]).reshape(-1)
        dist = np.asarray(outputs[i + levels]).reshape(-1, 4) * stride
        offsets = np.asarray(outputs[i + 2 * levels]).reshape(-1, 5, 2) * stride
        centers = anchor_centers(input_size, input_size, stride)
        if len(centers) != len(score):
            raise ValueError(f"stride {stride}: {len(score)} scores for {len(centers)} anchors")
        keep = score >= threshold
        c = centers[keep]
        d = dist[keep]
        scores.append(score[keep])
        boxes.append(np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], -1))
        points.append(c[:, None, :] + offsets[keep])
    score = np.concatenate(scores)
    if len(score) == 0:
        return []
    box = np.concatenate(boxes) / scale
    kps = np.concatenate(points) / scale
    order = score.argsort()[::-1]
    score, box, kps = score[order], box[order], kps[order]
    keep = nms(box, score, nms_threshold)
    return [Face(box=box[k].astype(np.float32), score=float(score[k]), keypoints=kps[k].astype(np.float32))
            for k in keep]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression on boxes sorted by descending score (insightface's +1 areas)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.arange(len(scores))
    keep: list[int] = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][overlap <= threshold]
    return keep


def largest_face(faces: list[Face]) -> Face | None:
    """The face with the largest box.

    The reference sorts by ``bbox[2] * bbox[3]`` (the product of the bottom-right corner's
    coordinates); we use the box area its name intends. The two agree for a single face.
    """
    return max(faces, key=lambda f: f.area) if faces else None


# -- recognition ---------------------------------------------------------------------------------------

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Umeyama 1991, eqs. (40)-(42); returns the 2x3 matrix [sR | t].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    rotation = u @ np.diag(d) @ vt
    var = (src_c ** 2).sum() / len(src)
    scale = (s * d).sum() / var if var > 0 else 1.0
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def align_face(image: np.ndarray, keypoints: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """Warp the face so its keypoints land on ArcFace's template: RGB uint8 [size, size, 3].

    insightface's ``face_align.norm_crop``: the least-squares similarity of ``estimate_norm``
    (skimage's ``SimilarityTransform.estimate``, i.e. Umeyama), then ``cv2.warpAffine`` (bilinear,
    constant border 0) — cv2's pixel-centre convention, which PIL's affine transform does not share.
    """
    if size % 112 == 0:
        template = ARCFACE_TEMPLATE * (size / 112.0)
    else:  # insightface's 128-multiple layout: scaled, then shifted right by 8 px per 128
        template = ARCFACE_TEMPLATE * (size / 128.0)
        template[:, 0] += 8.0 * size / 128.0
    matrix = similarity_transform(keypoints, template)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), borderValue=0.0)


def recognition_input(faces: list[np.ndarray]) -> np.ndarray:
    """Aligned RGB uint8 faces -> recognizer input [B, 3, 112, 112], (x - 127.5) / 127.5."""
    batch = np.stack(faces).astype(np.float32)
    return np.ascontiguousarray(((batch - 127.5) / 127.5).transpose(0, 3, 1, 2))


# -- IdentityNet condition -----------------------------------------------------------------------------

def draw_keypoints(width: int, height: int, keypoints: np.ndarray) -> np.ndarray:
    """InstantID's / Omni-Zero's ``draw_kps`` on a black canvas: RGB uint8 [height, width, 3].

    Limbs from each keypoint to the nose are ``cv2.ellipse2Poly`` polygons filled with
    ``cv2.fillConvexPoly`` on a float canvas, which is then scaled by 0.6; each keypoint gets a
    filled ``cv2.circle`` of radius 10 on top.
    """
    kps = np.asarray(keypoints, dtype=np.float64)
    canvas = np.zeros((height, width, 3))
    for start, end in KEYPOINT_LIMBS:
        x, y = kps[[start, end], 0], kps[[start, end], 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), LIMB_HALF_WIDTH),
                                   int(angle), 0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas, polygon, KEYPOINT_COLORS[start])
    canvas = (canvas * 0.6).astype(np.uint8)
    for (x, y), color in zip(kps, KEYPOINT_COLORS):
        canvas = cv2.circle(canvas, (int(x), int(y)), KEYPOINT_RADIUS, color, -1)
    return canvas
