"""The input store of queued jobs (``api.inputs``): round trip, clean-up, and that every file it
writes stays inside its directory whatever ids and names it is handed."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from api.inputs import InputsLost, InputStore, stored_reference

NAMES = ("image", "base_image", "mask")


def pixels(seed: int, shape=(24, 40, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    out = {}
    for path in root.rglob("*"):
        stat = path.stat()
        out[str(path.relative_to(root))] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return out


def test_round_trip_gives_back_the_same_pixels(tmp_path):
    store = InputStore(tmp_path / "inputs")
    images = {"image": pixels(1), "base_image": pixels(2, (7, 5, 3))}
    staging = store.stage(images)
    job_id = uuid.uuid4().hex
    store.commit(staging, job_id)
    assert not staging.exists()
    assert sorted(p.name for p in (tmp_path / "inputs" / job_id).iterdir()) == ["base_image.npy", "image.npy"]
    params = {"prompt": "x", "image": stored_reference("image"), "base_image": stored_reference("base_image"),
              "mask": None}
    loaded = store.load(job_id, params, NAMES)
    assert loaded["mask"] is None and set(loaded) == set(NAMES)
    for name, original in images.items():
        assert loaded[name].dtype == np.uint8 and loaded[name].shape == original.shape
        np.testing.assert_array_equal(loaded[name], original)


def test_only_uint8_rgb_arrays_are_stored(tmp_path):
    store = InputStore(tmp_path / "inputs")
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                [[0, 0, 0]]):
        with pytest.raises(ValueError, match="uint8"):
            store.stage({"image": bad})
    assert list((tmp_path / "inputs").iterdir()) == []  # the failed staging directories are gone


def test_missing_unreadable_or_foreign_inputs_are_inputs_lost(tmp_path):
    store = InputStore(tmp_path / "inputs")
    job_id = uuid.uuid4().hex
    store.commit(store.stage({"image": pixels(3)}), job_id)
    with pytest.raises(InputsLost, match="does not reference a stored image"):
        store.load(job_id, {"image": "https://example.com/a.png"}, ("image",))
    with pytest.raises(InputsLost, match="does not reference a stored image"):
        store.load(job_id, {"image": {"stored_input": "../../jobs.sqlite"}}, ("image",))
    with pytest.raises(InputsLost, match="missing"):
        store.load(job_id, {"mask": stored_reference("mask")}, ("mask",))
    target = tmp_path / "inputs" / job_id / "image.npy"
    target.write_bytes(target.read_bytes()[:60])  # truncated
    with pytest.raises(InputsLost, match="unreadable"):
        store.load(job_id, {"image": stored_reference("image")}, ("image",))
    np.save(target, np.array([{"not": "pixels"}], dtype=object), allow_pickle=True)  # a pickle is never loaded
    with pytest.raises(InputsLost, match="unreadable"):
        store.load(job_id, {"image": stored_reference("image")}, ("image",))
    np.save(target, np.zeros((3, 3), np.int64))
    with pytest.raises(InputsLost, match="not a uint8"):
        store.load(job_id, {"image": stored_reference("image")}, ("image",))


def test_discard_delete_and_sweep(tmp_path):
    root = tmp_path / "inputs"
    store = InputStore(root)
    discarded = store.stage({"image": pixels(4)})
    store.discard(discarded)
    assert not discarded.exists()
    pending, finished, deleted = (uuid.uuid4().hex for _ in range(3))
    for job_id in (pending, finished, deleted):
        store.commit(store.stage({"image": pixels(5)}), job_id)
    store.delete(deleted)
    store.delete(deleted)  # twice is fine
    assert not (root / deleted).exists()
    fresh_staging = store.stage({"image": pixels(6)})
    stale_staging = store.stage({"image": pixels(7)})
    old = time.time() - 7200
    os.utime(stale_staging, (old, old))
    (root / "not-a-job").mkdir()  # left alone: the sweep removes only what it could have written
    (root / "notes.txt").write_text("x")
    removed = store.sweep(lambda job_id: job_id == pending, staging_max_age_s=3600)
    assert removed == 2
    assert sorted(p.name for p in root.iterdir()) == sorted([pending, fresh_staging.name, "not-a-job", "notes.txt"])


@pytest.mark.parametrize("job_id", ["../escape", "..", "/tmp/x", "A" * 32, "0" * 31, "0" * 32 + "/..",
                                    "0" * 32 + "\n", ""])
def test_malformed_job_ids_are_refused(tmp_path, job_id):
    store = InputStore(tmp_path / "inputs")
    staging = store.stage({"image": pixels(8)})
    with pytest.raises(ValueError, match="invalid job id"):
        store.commit(staging, job_id)
    with pytest.raises(ValueError, match="invalid job id"):
        store.delete(job_id)
    with pytest.raises(ValueError, match="invalid job id"):
        store.load(job_id, {"image": stored_reference("image")}, ("image",))
    assert staging.is_dir()  # nothing was moved anywhere


def test_storage_stays_inside_the_store_directory(tmp_path):
    """Every operation, including refused ones with hostile ids and names, leaves the rest of the
    parent directory exactly as it was: no file created, changed or removed outside ``inputs/``."""
    parent = tmp_path / "data"
    root = parent / "inputs"
    (parent / "outputs").mkdir(parents=True)
    (parent / "jobs.sqlite").write_bytes(b"db")
    (tmp_path / "neighbour").write_text("keep")
    store = InputStore(root)
    before = {k: v for k, v in tree(tmp_path).items() if not k.startswith("data/inputs")}

    job_id = uuid.uuid4().hex
    store.commit(store.stage({"image": pixels(9), "mask": pixels(10)}), job_id)
    store.load(job_id, {"image": stored_reference("image"), "mask": stored_reference("mask")}, ("image", "mask"))
    for hostile in ("../outputs", "../../neighbour", str(tmp_path / "neighbour"), "x/../../../jobs"):
        with pytest.raises(ValueError):
            store.stage({hostile: pixels(11)})
        with pytest.raises(ValueError):
            store.commit(store.stage({"image": pixels(12)}), hostile)
        with pytest.raises(ValueError):
            store.delete(hostile)
    with pytest.raises(InputsLost):
        store.load(job_id, {"image": {"stored_input": "../../jobs.sqlite"}}, ("image",))
    store.sweep(lambda _job_id: False, staging_max_age_s=0)
    store.delete(job_id)

    after = {k: v for k, v in tree(tmp_path).items() if not k.startswith("data/inputs")}
    assert after == before
    assert (tmp_path / "neighbour").read_text() == "keep" and (parent / "jobs.sqlite").read_bytes() == b"db"
    assert list(root.iterdir()) == []  # and inside, everything was cleaned up
