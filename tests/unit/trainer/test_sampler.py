"""The resumable sampler: a resumed sampler serves exactly the batches the original would."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import InvalidArgumentError
from services.trainer.sampler import EpochSampler


def _take(sampler: EpochSampler, count: int) -> list[list[int] | None]:
    out: list[list[int] | None] = []
    for _ in range(count):
        batch = sampler.next_batch()
        out.append(None if batch is None else batch.tolist())
    return out


@pytest.mark.parametrize("served", [0, 1, 3, 4, 7, 11])
def test_resumed_sampler_continues_with_the_same_batches(served: int) -> None:
    original = EpochSampler(size=23, batch_size=5, seed=3)
    _take(original, served)
    saved = json.loads(json.dumps(original.state_dict()))  # JSON round trip, as in a checkpoint
    expected = _take(original, 12)

    resumed = EpochSampler(size=23, batch_size=5, seed=999)  # the seed comes from the state
    resumed.load_state_dict(saved)
    assert _take(resumed, 12) == expected


def test_every_epoch_is_a_new_permutation_and_covers_the_data() -> None:
    sampler = EpochSampler(size=20, batch_size=5, seed=0)
    epochs = []
    for _ in range(3):
        batches = []
        while (batch := sampler.next_batch()) is not None:
            batches.append(batch)
        epochs.append(torch.cat(batches))
    for order in epochs:
        assert sorted(order.tolist()) == list(range(20))
    assert not torch.equal(epochs[0], epochs[1])
    assert sampler.epoch == 3


def test_generator_state_at_save_time_would_give_a_different_order() -> None:
    # Why the sampler saves the state from the START of the epoch: after drawing the
    # epoch's permutation the generator has moved on, and redrawing from there differs.
    sampler = EpochSampler(size=50, batch_size=10, seed=1)
    sampler.next_batch()
    later = torch.Generator()
    later.set_state(sampler._generator.get_state())
    resumed = EpochSampler(size=50, batch_size=10, seed=1)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed._order is not None
    assert not torch.equal(torch.randperm(50, generator=later), resumed._order)


def test_drop_last_skips_the_short_batch_but_never_everything() -> None:
    assert EpochSampler(size=23, batch_size=5, seed=0).batches_per_epoch == 4
    assert EpochSampler(size=23, batch_size=5, seed=0, drop_last=False).batches_per_epoch == 5
    small = EpochSampler(size=3, batch_size=5, seed=0)
    batch = small.next_batch()
    assert small.batches_per_epoch == 1 and batch is not None and len(batch) == 3


def test_state_of_another_data_size_is_refused() -> None:
    state = EpochSampler(size=23, batch_size=5, seed=0).state_dict()
    with pytest.raises(InvalidArgumentError, match="size"):
        EpochSampler(size=24, batch_size=5, seed=0).load_state_dict(state)
