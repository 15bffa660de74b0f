"""The order rules of an upload: listed files, one after the other, contiguous offsets."""

from __future__ import annotations

import pytest

from common.errors import IntegrityError, InvalidArgumentError
from services.registry import FileRecord, UploadTracker

FILES = [
    FileRecord("model.pt2", "a" * 64, 10),
    FileRecord("manifest.json", "b" * 64, 4),
    FileRecord("empty.txt", "c" * 64, 0),
]


def test_files_in_contiguous_chunks_complete_the_upload() -> None:
    tracker = UploadTracker(FILES)
    assert tracker.accept("model.pt2", 0, 6).name == "model.pt2"
    tracker.accept("model.pt2", 6, 4)
    tracker.accept("manifest.json", 0, 4)
    tracker.finish()  # the empty file needs no chunk
    assert tracker.received("model.pt2") == 10


def test_files_may_come_in_any_order_one_after_the_other() -> None:
    tracker = UploadTracker(FILES)
    tracker.accept("manifest.json", 0, 4)
    tracker.accept("model.pt2", 0, 10)
    tracker.finish()


def test_a_chunk_of_an_unlisted_file_is_invalid() -> None:
    with pytest.raises(InvalidArgumentError, match="not one of the files") as err:
        UploadTracker(FILES).accept("weights.bin", 0, 1)
    assert err.value.field == "chunk.file_name"


def test_a_gap_or_overlap_in_offsets_is_invalid() -> None:
    tracker = UploadTracker(FILES)
    tracker.accept("model.pt2", 0, 4)
    for offset in (3, 5):
        with pytest.raises(InvalidArgumentError, match="expected 4") as err:
            tracker.accept("model.pt2", offset, 1)
        assert err.value.field == "chunk.chunk.offset"


def test_a_file_that_does_not_start_at_zero_is_invalid() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        UploadTracker(FILES).accept("model.pt2", 5, 5)
    assert err.value.field == "chunk.chunk.offset"


def test_interleaving_files_is_invalid() -> None:
    tracker = UploadTracker(FILES)
    tracker.accept("model.pt2", 0, 4)
    with pytest.raises(InvalidArgumentError, match="incomplete") as err:
        tracker.accept("manifest.json", 0, 4)
    assert err.value.field == "chunk.file_name"


def test_sending_a_file_again_is_invalid() -> None:
    tracker = UploadTracker(FILES)
    tracker.accept("manifest.json", 0, 4)
    tracker.accept("model.pt2", 0, 10)
    with pytest.raises(InvalidArgumentError, match="already sent"):
        tracker.accept("manifest.json", 4, 0)


def test_more_bytes_than_declared_is_data_loss() -> None:
    tracker = UploadTracker(FILES)
    tracker.accept("manifest.json", 0, 3)
    with pytest.raises(IntegrityError, match="longer than its declared 4 bytes"):
        tracker.accept("manifest.json", 3, 2)


def test_an_upload_that_ends_early_is_data_loss_naming_the_files() -> None:
    tracker = UploadTracker(FILES)
    tracker.accept("model.pt2", 0, 7)
    with pytest.raises(IntegrityError) as err:
        tracker.finish()
    assert "'model.pt2' (7 of 10 bytes)" in str(err.value)
    assert "'manifest.json' (0 of 4 bytes)" in str(err.value)
    assert "empty.txt" not in str(err.value)
