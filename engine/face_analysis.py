"""Face analysis for Omni-Zero: detection (SCRFD), five keypoints, recognition embedding (ArcFace).

The networks are the ONNX files of an insightface model pack (antelopev2: ``scrfd_10g_bnkps.onnx``
and ``glintr100.onnx``) and run as the ``face_detector`` and ``face_recognizer`` components; this
module owns everything around them, in numpy and PIL: letterboxing to the detector's square
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

import numpy as np
import PIL.Image
import PIL.ImageDraw

from engine.catalog import InvalidRequest

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


def find_face_models(directory: str | Path) -> FaceModelFiles:
    """Pick the detector and the recognizer in an insightface model pack as insightface does.

    A detector has at least five outputs (scores, boxes, keypoints per stride); a recognizer takes
    a 112x112 face and returns one embedding. Other models of the pack (landmarks, gender/age)
    are ignored. The first file of each kind in name order wins.
    """
    import onnx

    directory = Path(directory)
    files = sorted(directory.glob("*.onnx"))
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

    The image is resized to fit the square keeping its aspect ratio and placed at the top-left
    corner of a black canvas; pixels are normalised as (x - 127.5) / 128.
    """
    height, width = image.shape[:2]
    if height / width > 1.0:
        new_h, new_w = size, int(size * width / height)
    else:
        new_w, new_h = size, int(size * height / width)
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    resized = np.asarray(PIL.Image.fromarray(image).resize((new_w, new_h), PIL.Image.Resampling.BILINEAR))
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    canvas[:new_h, :new_w] = resized
    blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
    return np.ascontiguousarray(blob, dtype=np.float32), new_h / height


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
    """Warp the face so its keypoints land on ArcFace's template: RGB uint8 [size, size, 3]."""
    matrix = similarity_transform(keypoints, ARCFACE_TEMPLATE * (size / FACE_SIZE))
    # PIL maps output pixels back to input pixels: hand it the inverse transform.
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)[:2].reshape(-1)
    warped = PIL.Image.fromarray(image).transform((size, size), PIL.Image.Transform.AFFINE, tuple(inverse),
                                                  resample=PIL.Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(warped)


def recognition_input(faces: list[np.ndarray]) -> np.ndarray:
    """Aligned RGB uint8 faces -> recognizer input [B, 3, 112, 112], (x - 127.5) / 127.5."""
    batch = np.stack(faces).astype(np.float32)
    return np.ascontiguousarray(((batch - 127.5) / 127.5).transpose(0, 3, 1, 2))


# -- IdentityNet condition -----------------------------------------------------------------------------

def _ellipse_polygon(center: tuple[float, float], half_axes: tuple[int, int], angle_deg: int) -> list[tuple[int, int]]:
    """Vertices of a rotated ellipse every degree, on integer pixels."""
    (cx, cy), (a, b) = center, half_axes
    alpha = math.radians(angle_deg)
    cos_a, sin_a = math.cos(alpha), math.sin(alpha)
    points = []
    for deg in range(0, 361):
        t = math.radians(deg)
        x = cx + a * math.cos(t) * cos_a - b * math.sin(t) * sin_a
        y = cy + a * math.cos(t) * sin_a + b * math.sin(t) * cos_a
        point = (int(round(x)), int(round(y)))
        if not points or points[-1] != point:
            points.append(point)
    return points


def draw_keypoints(width: int, height: int, keypoints: np.ndarray) -> np.ndarray:
    """InstantID's face-keypoint image on black: limbs to the nose at 60 %, then a disc per keypoint."""
    canvas = PIL.Image.new("RGB", (width, height))
    draw = PIL.ImageDraw.Draw(canvas)
    kps = np.asarray(keypoints, dtype=np.float64)
    for start, end in KEYPOINT_LIMBS:
        (x0, y0), (x1, y1) = kps[start], kps[end]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = int(math.degrees(math.atan2(y0 - y1, x0 - x1)))
        center = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        draw.polygon(_ellipse_polygon(center, (int(length / 2), LIMB_HALF_WIDTH), angle),
                     fill=KEYPOINT_COLORS[start])
    canvas = PIL.Image.fromarray((np.asarray(canvas) * 0.6).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(canvas)
    r = KEYPOINT_RADIUS
    for (x, y), color in zip(kps, KEYPOINT_COLORS):
        x, y = int(x), int(y)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    return np.asarray(canvas)
