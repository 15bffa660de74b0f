"""A deterministic, resumable batch sampler over an in-memory dataset.

Each epoch is one permutation drawn from the sampler's own `torch.Generator`
(seeded from the job seed). To resume in the middle of an epoch the sampler
needs the generator's state *as it was when the epoch's permutation was drawn*
plus the index of the next batch: it draws the same permutation again and
skips the batches already served. The generator's state at save time would
not do: it has already moved past this epoch's permutation, and the resumed
run would serve the rest of a different one.
"""

from __future__ import annotations

import base64
from typing import Any

import torch

from common.errors import InvalidArgumentError

__all__ = ["EpochSampler"]


class EpochSampler:
    """Batches of indices into `size` samples, shuffled per epoch, resumable mid-epoch.

    `next_batch()` returns the next batch's indices, or None at the end of an
    epoch (the next call starts the following epoch). With `drop_last` a last
    batch smaller than `batch_size` is skipped.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, *, shuffle: bool = True, drop_last: bool = True
    ) -> None:
        if size <= 0 or batch_size <= 0:
            raise InvalidArgumentError(
                f"sampler needs size and batch_size > 0, got {size}, {batch_size}"
            )
        self.size = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        # Never drop every sample: a dataset smaller than a batch is served as one batch.
        self.drop_last = drop_last and size >= batch_size
        self.seed = seed
        self.epoch = 0
        self.batch_index = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._epoch_start_state: torch.Tensor | None = None
        self._order: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def next_batch(self) -> torch.Tensor | None:
        """Indices of the next batch (int64), or None when this epoch is done."""
        if self._order is None:
            self._start_epoch()
        assert self._order is not None
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
            self._order = None
            return None
        start = self.batch_index * self.batch_size
        self.batch_index += 1
        return self._order[start : start + self.batch_size]

    def _start_epoch(self) -> None:
        self._epoch_start_state = self._generator.get_state()
        if self.shuffle:
            self._order = torch.randperm(self.size, generator=self._generator)
        else:
            self._order = torch.arange(self.size)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position: epoch, next batch, generator state at the epoch's start."""
        if self._order is None:
            self._epoch_start_state = self._generator.get_state()
        assert self._epoch_start_state is not None
        return {
            "size": self.size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "epoch_start_state": base64.b64encode(self._epoch_start_state.numpy().tobytes()).decode(
                "ascii"
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved sampler was (same data size and batch size)."""
        for key in ("size", "batch_size", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise InvalidArgumentError(
                    f"sampler state has {key}={state[key]!r}, this sampler {getattr(self, key)!r}; "
                    "resume with the same data and batch size"
                )
        raw = base64.b64decode(state["epoch_start_state"])
        start = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
        self._generator.set_state(start)
        self._start_epoch()
