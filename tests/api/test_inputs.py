"""Stored job inputs (``diffserve.api.inputs``): the ``.npy`` bytes kept with a job give back exactly the
decoded pixels, only uint8 RGB arrays are stored, and anything else read back is ``InputsLost``."""

from __future__ import annotations

import io

import numpy as np
import pytest

from diffserve.api.inputs import InputsLost, pixels_from_bytes, pixels_to_bytes, stored_reference

NAMES = ("image", "base_image", "mask")


def pixels(seed: int, shape=(24, 40, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_round_trip_gives_back_the_same_pixels():
    images = {"image": pixels(1), "base_image": pixels(2, (7, 5, 3))}
    stored = {name: pixels_to_bytes(image, name) for name, image in images.items()}
    params = {"prompt": "x", "image": stored_reference("image"), "base_image": stored_reference("base_image"),
              "mask": None}
    loaded = pixels_from_bytes(stored, params, NAMES)
    assert loaded["mask"] is None and set(loaded) == set(NAMES)
    for name, original in images.items():
        assert loaded[name].dtype == np.uint8 and loaded[name].shape == original.shape
        np.testing.assert_array_equal(loaded[name], original)


def test_only_uint8_rgb_arrays_are_stored():
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                [[0, 0, 0]]):
        with pytest.raises(ValueError, match="uint8"):
            pixels_to_bytes(bad, "image")


def npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_missing_unreadable_or_foreign_inputs_are_inputs_lost():
    params = {"image": stored_reference("image")}
    with pytest.raises(InputsLost, match="missing"):
        pixels_from_bytes({}, params, ("image",))
    with pytest.raises(InputsLost, match="unreadable"):
        pixels_from_bytes({"image": pixels_to_bytes(pixels(3), "image")[:60]}, params, ("image",))  # truncated
    with pytest.raises(InputsLost, match="unreadable"):  # a pickle is never loaded
        pixels_from_bytes({"image": npy(np.array([{"not": "pixels"}], dtype=object), allow_pickle=True)}, params,
                          ("image",))
    with pytest.raises(InputsLost, match="not a uint8"):
        pixels_from_bytes({"image": npy(np.zeros((3, 3), np.int64))}, params, ("image",))
