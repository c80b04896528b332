"""FLOPs formula, MetricsLogger (JSONL + TensorBoard), log line, read-back and the plot CLI."""

import json
import math

import pytest

from mtnlg.plot import main as plot_main
from mtnlg.training.metrics import (
    MetricsLogger,
    achieved_tflops,
    drop_superseded,
    flops_per_iteration,
    format_log_line,
    mfu,
    read_metrics,
)

GPT3 = dict(batch_size=1536, seq_length=2048, num_layers=96, hidden_size=12288, vocab_size=51200)

# ---------------------------------------------------------------- FLOPs


def _expanded(B, s, l, h, V, recompute):  # noqa: E741
    """Per-layer matmuls 24Bsh^2 + attention 4Bs^2h, logits 2BshV; fwd+bwd = 3 fwd."""
    layers = 24 * B * s * l * h**2 + 4 * B * s**2 * l * h
    logits = 2 * B * s * h * V
    return (4 if recompute else 3) * layers + 3 * logits


def test_flops_gpt3_175b():
    B, s, l, h, V = GPT3.values()  # noqa: E741
    got = flops_per_iteration(**GPT3, recompute=False)
    assert got == pytest.approx(_expanded(B, s, l, h, V, False), rel=1e-12)
    # same as 72 B s l h^2 (1 + s/6h + V/12lh), and close to 6 N D with N = 12 l h^2
    assert got == pytest.approx(72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h)))
    six_nd = 6 * (12 * l * h * h) * B * s
    assert 1.0 < got / six_nd < 1.05
    assert got == pytest.approx(3.386e18, rel=1e-3)


def test_flops_recompute():
    B, s, l, h, V = GPT3.values()  # noqa: E741
    plain = flops_per_iteration(**GPT3, recompute=False)
    full = flops_per_iteration(**GPT3, recompute=True)
    assert full == pytest.approx(_expanded(B, s, l, h, V, True), rel=1e-12)
    # transformer layers recomputed (4/3), logits not: just under 4/3 of the model FLOPs
    assert full == pytest.approx(plain * 4 / 3 - 2 * B * s * h * V, rel=1e-12)
    assert full == pytest.approx(4.5e18, rel=0.01)  # Megatron paper's per-iteration figure
    assert 1.32 < full / plain < 4 / 3


def test_tflops_and_mfu():
    assert achieved_tflops(3.2e15, 2.0, 8) == pytest.approx(200.0)
    assert mfu(200.0, 312.0) == pytest.approx(200 / 312)
    with pytest.raises(ValueError):
        achieved_tflops(1.0, 0.0, 8)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0)


# ---------------------------------------------------------------- logger


def test_logger_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, tb = tmp_path / "sub" / "metrics.jsonl", tmp_path / "tb"
    with MetricsLogger(str(path), str(tb), enabled=True) as log:
        log.log_train(10, {"consumed_samples": 640, "loss": 5.5, "lr": 1e-4, "skipped_iters": 0})
        log.log_train(20, {"consumed_samples": 1280, "loss": 4.5, "lr": 2e-4, "grad_norm": None})
        log.log_eval(20, {"val_loss": 4.25, "val_ppl": math.exp(4.25)})
    with MetricsLogger(str(path), None) as log:  # a resumed run appends
        log.log_train(30, {"loss": float("nan")})

    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["kind"] for r in records] == ["train", "train", "eval", "train"]
    assert records[0] == {
        "kind": "train",
        "iteration": 10,
        "consumed_samples": 640,
        "loss": 5.5,
        "lr": 1e-4,
        "skipped_iters": 0,
    }
    assert records[2]["val_loss"] == 4.25 and math.isnan(records[3]["loss"])
    assert read_metrics(str(path), kind="eval") == [records[2]]

    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/loss", "eval/ppl"} <= set(tags)
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(10, 5.5), (20, 4.5)]
    assert acc.Scalars("eval/loss")[0].value == pytest.approx(4.25)


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(str(tmp_path / "m.jsonl"), str(tmp_path / "tb"), enabled=False)
    log.log_train(1, {"loss": 1.0})
    log.log_eval(1, {"val_loss": 1.0})
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_tensor_values_are_plain_numbers(tmp_path):
    import torch

    with MetricsLogger(str(tmp_path / "m.jsonl"), None) as log:
        log.log_train(1, {"loss": torch.tensor(2.5), "grad_norm": torch.tensor(0.5)})
    assert read_metrics(str(tmp_path / "m.jsonl"))[0]["loss"] == 2.5


def test_format_log_line():
    line = format_log_line(
        10,
        100,
        {
            "consumed_samples": 640,
            "loss": 5.123,
            "lr": 1e-4,
            "grad_norm": 1.2341,
            "loss_scale": None,
            "tokens_per_sec": 12345.6,
            "tflops_per_gpu": 123.45,
            "mfu": 0.3951,
            "custom_thing": 0.5,
        },
    )
    assert line == (
        "iteration 10/100 | consumed samples 640 | loss 5.123E+00 | lr 1.000E-04 | "
        "grad norm 1.234 | tokens/s 12346 | TFLOP/s/GPU 123.5 | MFU 39.5% | custom thing 0.5"
    )
    assert format_log_line(3, None, {}) == "iteration 3"


def test_read_metrics_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"kind": "train", "iteration": 1, "loss": 3.0}\n{"kind": "tr')
    assert read_metrics(str(path)) == [{"kind": "train", "iteration": 1, "loss": 3.0}]
    path.write_text('{"kind": "tr\n{"kind": "train", "iteration": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_metrics(str(path))


def test_drop_superseded():
    recs = [{"kind": "train", "iteration": i} for i in (10, 20, 30)]
    recs += [{"kind": "eval", "iteration": 20}]
    recs += [{"kind": "train", "iteration": i} for i in (30, 40)]  # resumed from iteration 20
    kept = drop_superseded(recs)
    assert [(r["kind"], r["iteration"]) for r in kept] == [
        ("train", 10),
        ("train", 20),
        ("eval", 20),
        ("train", 30),
        ("train", 40),
    ]


# ---------------------------------------------------------------- plot CLI


def _write_run(path, scale):
    with MetricsLogger(str(path), None) as log:
        for it in range(1, 21):
            log.log_train(it, {"consumed_tokens": it * 4096, "loss": scale * 10 / it})
            if it % 5 == 0:
                log.log_eval(it, {"val_loss": scale * 11 / it})


@pytest.mark.parametrize("x", ["iteration", "tokens"])
def test_plot_two_files(tmp_path, x):
    a, b = tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl"
    _write_run(a, 1.0)
    _write_run(b, 1.2)
    out = tmp_path / "plots" / "loss.png"
    assert (
        plot_main([str(a), str(b), "--output", str(out), "--x", x, "--title", "t", "--logy"]) == 0
    )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(p.name for p in out.parent.iterdir()) == ["loss.png"]  # no temp file left


def test_plot_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SystemExit) as exc:
        plot_main([str(missing), "--output", str(tmp_path / "x.png")])
    assert exc.value.code not in (0, None) and str(missing) in str(exc.value.code)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as exc:
        plot_main([str(empty), "--output", str(tmp_path / "x.png")])
    assert str(empty) in str(exc.value.code)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit) as exc:
        plot_main(["--help"])
    assert exc.value.code == 0
