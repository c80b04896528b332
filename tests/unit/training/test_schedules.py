"""LR schedule and batch ramp-up against values computed here from their definitions."""

import math

import pytest

from mtnlg.training.schedules import BatchRampup, LRSchedule, mtnlg_recipe

B = 1_000_000_000  # tokens


# ---------------------------------------------------------------- LR, iteration mode


def test_warmup_then_linear_decay_iterations():
    s = LRSchedule(lr=1e-3, min_lr=1e-4, decay_style="linear", warmup_iters=10, decay_iters=110)
    assert s.lr_at(0, 0) == 0.0
    assert s.lr_at(3, 0) == pytest.approx(1e-3 * 3 / 10)
    assert s.lr_at(10, 0) == pytest.approx(1e-3)
    # 25 of the 100 decay iterations done: a quarter of the way from lr to min_lr
    assert s.lr_at(35, 0) == pytest.approx(1e-3 - 0.25 * (1e-3 - 1e-4))
    assert s.lr_at(110, 0) == pytest.approx(1e-4)
    assert s.lr_at(10_000, 0) == 1e-4


def test_cosine_decay_iterations():
    s = LRSchedule(lr=6e-4, min_lr=6e-5, decay_style="cosine", warmup_iters=100, decay_iters=1100)
    for it in (150, 350, 600, 1000):
        progress = (it - 100) / 1000
        expected = 6e-5 + (6e-4 - 6e-5) * 0.5 * (1 + math.cos(math.pi * progress))
        assert s.lr_at(it, 123) == pytest.approx(expected, rel=1e-12)
    assert s.lr_at(600, 0) == pytest.approx((6e-4 + 6e-5) / 2)  # half way: the mean
    assert s.lr_at(2000, 0) == 6e-5


def test_no_warmup_and_constant():
    s = LRSchedule(lr=2e-4, decay_style="linear", decay_iters=50)
    assert s.lr_at(0, 0) == pytest.approx(2e-4)  # no warmup: full lr at step 0
    assert s.lr_at(25, 0) == pytest.approx(1e-4)
    c = LRSchedule(lr=3e-4, min_lr=1e-5, decay_style="constant", warmup_iters=4)
    assert c.lr_at(2, 0) == pytest.approx(1.5e-4)
    assert c.lr_at(4, 0) == c.lr_at(10**9, 0) == pytest.approx(3e-4)


def test_monotone_decay():
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=5, decay_iters=100)
    values = [s.lr_at(i, 0) for i in range(5, 200)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ---------------------------------------------------------------- LR, tokens mode


def test_tokens_mode_ignores_iteration():
    s = LRSchedule(lr=1e-4, decay_style="linear", warmup_tokens=1000, decay_tokens=5000)
    assert s.tokens_mode
    assert s.lr_at(999_999, 250) == pytest.approx(1e-4 * 250 / 1000)
    assert s.lr_at(0, 3000) == pytest.approx(1e-4 * (1 - 2000 / 4000))
    assert s.lr_at(0, 6000) == 0.0


def test_mtnlg_lr_schedule():
    lr, _ = mtnlg_recipe()
    peak, floor = 5e-5, 5e-6
    assert lr.lr_at(0, 0) == 0.0
    assert lr.lr_at(0, B // 2) == pytest.approx(peak / 2)
    assert lr.lr_at(0, 1 * B) == pytest.approx(peak)
    assert lr.lr_at(0, 170_500_000_000) == pytest.approx((peak + floor) / 2)  # mid decay
    assert lr.lr_at(0, 340 * B) == pytest.approx(floor)
    assert lr.lr_at(0, 400 * B) == pytest.approx(floor)
    x = 100 * B
    expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (x - B) / (339 * B)))
    assert lr.lr_at(0, x) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- LR validation and state


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(lr=0.0, decay_iters=10), "--lr"),
        (dict(lr=1e-4, min_lr=1e-3, decay_iters=10), "--min-lr"),
        (dict(lr=1e-4, decay_style="step", decay_iters=10), "--lr-decay-style"),
        (dict(lr=1e-4, warmup_iters=20, decay_iters=10), "--lr-decay-iters"),
        (dict(lr=1e-4, decay_style="cosine"), "--lr-decay-iters"),
        (dict(lr=1e-4, warmup_iters=-1, decay_iters=10), "--lr-warmup-iters"),
        (dict(lr=1e-4, warmup_tokens=10, decay_tokens=5), "--lr-decay-tokens"),
        (dict(lr=1e-4, warmup_tokens=10), "--lr-decay-tokens"),
        (dict(lr=1e-4, decay_iters=10, decay_tokens=100), "--lr-decay-tokens"),
        (dict(lr=1e-4, warmup_iters=5, decay_tokens=100), "--lr-warmup-iters"),
    ],
)
def test_bad_flags(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        LRSchedule(**kwargs)


def test_state_dict_round_trip_and_mismatch():
    saved, _ = mtnlg_recipe()
    state = saved.state_dict()
    assert LRSchedule.from_state_dict(state) == saved
    same, _ = mtnlg_recipe()
    same.load_state_dict(state)  # identical: accepted
    changed = LRSchedule(lr=1e-4, min_lr=5e-6, warmup_tokens=B, decay_tokens=340 * B)
    with pytest.raises(ValueError, match="lr: checkpoint 5e-05, now 0.0001"):
        changed.load_state_dict(state)
    changed.load_state_dict(state, override=True)  # the new schedule is kept
    assert changed.lr == 1e-4
    with pytest.raises(ValueError, match="unknown"):
        LRSchedule.from_state_dict({**state, "bogus": 1})


# ---------------------------------------------------------------- batch ramp-up


def test_mtnlg_ramp():
    _, ramp = mtnlg_recipe()
    assert ramp.ramp_samples == 5_859_375
    interval = 5_859_375 / 59  # (1920 - 32) / 32 increments
    assert ramp.global_batch_at(0) == 32
    assert ramp.global_batch_at(math.floor(interval)) == 32
    assert ramp.global_batch_at(math.ceil(interval)) == 64
    assert ramp.global_batch_at(math.ceil(30 * interval)) == 32 + 30 * 32
    assert ramp.global_batch_at(5_859_374) == 1888
    assert ramp.global_batch_at(5_859_375) == 1920
    assert ramp.global_batch_at(10**12) == 1920
    sizes = [ramp.global_batch_at(c) for c in range(0, 6_000_000, 997)]
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert set(sizes) == {32 + 32 * k for k in range(60)}
    ramp.check(micro_batch_size=1, data_parallel_size=8)  # MT-NLG: 8 DP replicas x 35 pipes


def _brute_force(ramp: BatchRampup, train_samples: int) -> tuple[int, int]:
    iters = consumed = 0
    while consumed + ramp.global_batch_at(consumed) <= train_samples:
        consumed += ramp.global_batch_at(consumed)
        iters += 1
    return iters, consumed


@pytest.mark.parametrize(
    "ramp",
    [
        BatchRampup(1920, 32, 32, 5_859_375),
        BatchRampup(64, 8, 8, 1000),
        BatchRampup(48, 16, 16, 0),  # no ramp samples: the final batch at once
        BatchRampup(24),  # constant
    ],
)
def test_iterations_for_samples_matches_brute_force(ramp):
    for train_samples in (0, 7, 31, 32, 33, 1000, 12_345, 5_859_375, 6_000_017, 9_000_000):
        iters, consumed = _brute_force(ramp, train_samples)
        assert ramp.num_iterations_for_samples(train_samples) == iters
        assert ramp.samples_after_iterations(iters) == consumed


def test_samples_after_iterations_small_ramp():
    ramp = BatchRampup(
        global_batch_size=16, start_batch_size=4, batch_size_increment=4, ramp_samples=30
    )  # 3 increments, one every 10 samples
    # batch at consumed c is 4 + 4 * floor(c / 10) before 30, then 16:
    # 0 -> 4, 4 -> 4, 8 -> 4, 12 -> 8, 20 -> 12, 32 -> 16, 48 -> 16, ...
    expected = [0, 4, 8, 12, 20, 32, 48, 64, 80]
    assert [ramp.num_iterations_for_samples(c) for c in (11, 12, 19, 20, 31, 32)] == [
        2,
        3,
        3,
        4,
        4,
        5,
    ]
    assert [ramp.samples_after_iterations(n) for n in range(9)] == expected


def test_ramp_validation():
    with pytest.raises(ValueError, match="divisible by INCREMENT"):
        BatchRampup(100, 32, 32, 1000)
    with pytest.raises(ValueError, match="START"):
        BatchRampup(32, 64, 32, 1000)
    with pytest.raises(ValueError, match="--rampup-batch-size: global batch 48"):
        BatchRampup(64, 32, 16, 1000).check(micro_batch_size=2, data_parallel_size=16)
    with pytest.raises(ValueError, match="--global-batch-size: global batch 96"):
        BatchRampup(96).check(micro_batch_size=4, data_parallel_size=16)
    with pytest.raises(ValueError, match="--micro-batch-size"):
        BatchRampup(64, 16, 16, 1000).check(micro_batch_size=32, data_parallel_size=1)
    BatchRampup(64, 32, 32, 1000).check(micro_batch_size=32, data_parallel_size=1)
    assert BatchRampup(64, 32, 32, 1000).num_micro_batches(0, 4, 2) == 4


def test_from_args():
    assert BatchRampup.from_args(1920, [32, 32, 5_859_375]) == mtnlg_recipe()[1]
    assert BatchRampup.from_args(256, None).global_batch_at(0) == 256
    with pytest.raises(ValueError, match="three ints"):
        BatchRampup.from_args(256, [32, 32])
