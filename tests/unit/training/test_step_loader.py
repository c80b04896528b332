"""``StepLoader``: the same micro-batches as ``rank_micro_batches``, built one step ahead on a
background thread, only on the pipeline stages that load data, pinned where the accelerator pins.

The reference is ``rank_micro_batches`` itself, called synchronously on the same dataset: the
loader must hand over bit-identical tensors for every step (exact resume depends on it).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from deepspeed.accelerator import get_accelerator

from mtnlg.distributed.init import current_device
from mtnlg.training.data import StepLoader, rank_micro_batches

SEQ = 5


class Samples:
    """Sample i is ``SEQ + 1`` distinct tokens; records which thread read it."""

    def __init__(self, n: int):
        self.n, self.reads = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} out of range for {self.n}")
        self.reads.append((i, threading.current_thread().name))
        return {"text": np.arange(i * 100, i * 100 + SEQ + 1, dtype=np.int64)}


# (start, global batch) of consecutive steps through a batch-size ramp: 4, 4, 8, 8, 16
STEPS = [(0, 4), (4, 4), (8, 8), (16, 8), (24, 16)]


def _same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (gi, gl), (wi, wl) in zip(got, want):
        assert torch.equal(gi.cpu(), wi) and torch.equal(gl.cpu(), wl)


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_prefetched_steps_equal_rank_micro_batches(dp_rank):
    data, ref, device = Samples(64), Samples(64), current_device()
    with StepLoader(data, 2, 2, dp_rank, device) as loader:
        for k, (start, gb) in enumerate(STEPS):
            got = loader.get(start, gb)
            if k + 1 < len(STEPS):
                loader.prefetch(*STEPS[k + 1])
            _same(got, rank_micro_batches(ref, start, gb, 2, 2, dp_rank))
            for ids, labels in got:
                assert ids.device == labels.device == device
    built = [name for _, name in data.reads]
    # this DP rank reads half of each global batch: step 0 on the caller's thread, later
    # steps (prefetched) on the loader's
    assert built.count(threading.current_thread().name) == STEPS[0][1] // 2
    assert built.count("mtnlg-data_0") == sum(gb for _, gb in STEPS[1:]) // 2


def test_a_stale_prefetch_is_not_used():
    """A prefetched step other than the one asked for (e.g. the batch size changed) is rebuilt."""
    with StepLoader(Samples(64), 2, 1, 0, "cpu") as loader:
        loader.prefetch(8, 4)
        _same(loader.get(8, 8), rank_micro_batches(Samples(64), 8, 8, 2, 1, 0))


def test_middle_stage_reads_nothing():
    data = Samples(64)
    with StepLoader(data, 2, 2, 0, current_device(), first=False, last=False) as loader:
        loader.prefetch(0, 8)
        assert loader.get(0, 8) == [None, None]
    assert data.reads == []


def test_first_stage_moves_inputs_last_stage_moves_labels():
    data, device = Samples(64), current_device()
    with StepLoader(data, 2, 1, 0, device, first=True, last=False) as first:
        ((ids, labels),) = first.get(0, 2)
    assert ids.device == device and labels.device.type == "cpu"
    with StepLoader(data, 2, 1, 0, device, first=False, last=True) as last:
        ((ids, labels),) = last.get(0, 2)
    assert ids.device.type == "cpu" and labels.device == device


def test_pinned_only_where_the_accelerator_pins():
    """The host copies of what goes to the device are page-locked on an accelerator; on
    DeepSpeed's CPU accelerator they stay ordinary memory."""
    pins = get_accelerator().device_name() != "cpu"
    loader = StepLoader(Samples(8), 2, 1, 0, current_device(), first=True, last=False)
    ((ids, labels),) = loader._host(0, 2)
    loader.close()
    assert ids.is_pinned() == pins
    assert not labels.is_pinned()  # the first stage does not use the labels


def test_a_failing_read_reaches_the_caller():
    with StepLoader(Samples(6), 2, 1, 0, "cpu") as loader:
        loader.prefetch(4, 4)
        with pytest.raises(IndexError, match="sample 6 out of range"):
            loader.get(4, 4)
