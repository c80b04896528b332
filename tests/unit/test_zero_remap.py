"""Reading a saved ZeRO flat group around parameters the model no longer has (``zero_state.remap``)."""

from __future__ import annotations

import pytest
import torch

from mtnlg.checkpoint import zero_state as zs
from mtnlg.checkpoint.rules import CheckpointError

SAVED = [("words", 12), ("positions", 7), ("ln.weight", 3), ("ln.bias", 3)]


def test_equal_layouts_need_no_remap():
    assert zs.remap(SAVED, list(SAVED), "t") is None


def test_dropped_parameter_splits_the_group_into_runs():
    r = zs.remap(SAVED, [SAVED[0], SAVED[2], SAVED[3]], "t")
    assert r.dropped == ("positions",) and r.saved_total == 25
    assert r.runs == ((0, 0, 12), (12, 19, 6))  # the two LayerNorm tensors: one run


def test_other_differences_are_errors():
    with pytest.raises(CheckpointError, match="no extra"):
        zs.remap(SAVED, [*SAVED, ("extra", 2)], "t")
    with pytest.raises(CheckpointError, match="ln.weight"):
        zs.remap(SAVED, [SAVED[0], ("ln.weight", 4)], "t")  # another shape


@pytest.mark.parametrize("saved_dp,dp", [(2, 1), (3, 2)])
def test_partitions_read_around_the_dropped_table(saved_dp, dp):
    """State saved at ``saved_dp`` with the table, cut for ``dp`` without it: each partition
    equals the flat vector with the table's elements removed."""
    total = 25
    flat = {k: torch.randn(total) for k in zs.KINDS}
    tmpl = {"base_optimizer_state": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []}}
    tmpl["zero_stage"] = 1
    whole = zs.build_osd(tmpl, [dict(flat)], [total], 1, 0)  # one DP rank: the flat vector

    def cut(d: int) -> dict:  # the file DP rank d of saved_dp would hold
        part = zs.rank_partition(zs.FlatReader(lambda _: whole, 1, "t"), 0, total, saved_dp, d)
        return zs.build_osd(tmpl, [part], [total], saved_dp, d)

    osds = [cut(d) for d in range(saved_dp)]
    layout = zs.remap(SAVED, [SAVED[0], SAVED[2], SAVED[3]], "t")
    kept = {k: torch.cat([v[:12], v[19:]]) for k, v in flat.items()}  # 18 elements
    new_part = zs.partition_numel(18, dp)
    for d in range(dp):
        reader = zs.FlatReader(lambda i: osds[i], saved_dp, "t")
        got = zs.rank_partition(reader, 0, 18, dp, d, layout)
        for k in zs.KINDS:
            want = kept[k][d * new_part : (d + 1) * new_part]
            assert torch.equal(got[k][: want.numel()], want)
            assert got[k].numel() == new_part and not got[k][want.numel() :].any()
