"""The order rules of a RegisterModel upload (pure): which chunk may come next.

After the metadata, the files listed there arrive one after the other, each as
chunks in order from offset 0 with contiguous offsets. The tracker checks every
chunk before its bytes are written:

- a chunk of a file that is not listed, of a file already complete, or of a new
  file while the previous one is still incomplete: `INVALID_ARGUMENT`
  (`chunk.file_name`);
- a chunk that does not start where the file's previous chunk ended:
  `INVALID_ARGUMENT` (`chunk.chunk.offset`);
- more bytes than the file's declared size: `DATA_LOSS` (the content does not
  match what the metadata declared).

At the end of the stream `finish` fails with `DATA_LOSS` naming every file that
did not arrive complete. Files of size 0 need no chunk. Checking the sha256 is
the writer's part (it sees the bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

from common.errors import IntegrityError, InvalidArgumentError
from services.registry.records import FileRecord

__all__ = ["UploadTracker"]


class UploadTracker:
    """Follows one upload's chunks against the files its metadata declared."""

    def __init__(self, files: Sequence[FileRecord]) -> None:
        self._files = {f.name: f for f in files}
        self._received = dict.fromkeys(self._files, 0)
        self._current: str | None = None
        self._started: set[str] = set()

    def received(self, name: str) -> int:
        """Bytes of `name` accepted so far."""
        return self._received[name]

    def accept(self, file_name: str, offset: int, length: int) -> FileRecord:
        """Check one chunk (`length` bytes of `file_name` at `offset`); the file it belongs to."""
        declared = self._files.get(file_name)
        if declared is None:
            raise InvalidArgumentError(
                f"{file_name[:80]!r} is not one of the files the metadata lists "
                f"({', '.join(sorted(self._files))})",
                field="chunk.file_name",
            )
        if file_name != self._current:
            if file_name in self._started:
                raise InvalidArgumentError(
                    f"file {file_name!r} was already sent; each file comes once, in one piece",
                    field="chunk.file_name",
                )
            current = self._current
            if current is not None and not self._complete(current):
                raise InvalidArgumentError(
                    f"a chunk of {file_name!r} arrived while {current!r} is incomplete "
                    f"({self._received[current]} of {self._files[current].size_bytes} bytes); "
                    "send the files one after the other",
                    field="chunk.file_name",
                )
            self._current = file_name
            self._started.add(file_name)
        received = self._received[file_name]
        if offset != received:
            raise InvalidArgumentError(
                f"chunk of {file_name!r} starts at {offset}, expected {received} "
                "(chunks come in order with contiguous offsets)",
                field="chunk.chunk.offset",
            )
        if received + length > declared.size_bytes:
            raise IntegrityError(
                f"file {file_name!r} is longer than its declared {declared.size_bytes} bytes"
            )
        self._received[file_name] = received + length
        return declared

    def finish(self) -> None:
        """Check that every declared file arrived complete; `IntegrityError` otherwise."""
        missing = [
            f"{name!r} ({self._received[name]} of {f.size_bytes} bytes)"
            for name, f in self._files.items()
            if not self._complete(name)
        ]
        if missing:
            raise IntegrityError(
                "upload ended before these files were complete: " + ", ".join(missing)
            )

    def _complete(self, name: str) -> bool:
        return self._received[name] == self._files[name].size_bytes
