"""``ServerMetrics``: the values of every series after a scripted request life, read back from
the text ``render()`` returns (Prometheus's own parser), and thread safety under load."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtnlg.monitoring.serving import FINISH_REASONS, ServerMetrics


def samples(metrics: ServerMetrics) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, parsed from the rendered text."""
    body, ctype = metrics.render()
    assert ctype.startswith("text/plain") and "version=" in ctype
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(s: dict, name: str, **labels) -> float:
    return s[(name, tuple(sorted({"model_name": "tiny", **labels}.items())))]


def test_one_request_life():
    m = ServerMetrics("tiny")
    m.on_arrival("a", now=10.0)
    m.set_queue(running=0, waiting=1)
    m.on_admit(prompt_tokens=5)
    m.set_queue(running=1, waiting=0)
    for t in (10.5, 10.6, 10.8):  # TTFT 0.5, then ITL 0.1 and 0.2
        m.on_token("a", now=t)
    m.on_finish("a", "length", now=11.0)
    m.on_error(429)
    m.on_error(429)
    m.on_error(400)
    s = samples(m)
    assert value(s, "mtnlg:num_requests_running") == 1
    assert value(s, "mtnlg:num_requests_waiting") == 0
    assert value(s, "mtnlg:prompt_tokens_total") == 5
    assert value(s, "mtnlg:generation_tokens_total") == 3
    assert value(s, "mtnlg:time_to_first_token_seconds_count") == 1
    assert value(s, "mtnlg:time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value(s, "mtnlg:time_to_first_token_seconds_bucket", le="0.25") == 0
    assert value(s, "mtnlg:time_to_first_token_seconds_bucket", le="0.5") == 1
    assert value(s, "mtnlg:inter_token_latency_seconds_count") == 2
    assert value(s, "mtnlg:inter_token_latency_seconds_sum") == pytest.approx(0.3)
    assert value(s, "mtnlg:e2e_request_latency_seconds_count") == 1
    assert value(s, "mtnlg:e2e_request_latency_seconds_sum") == pytest.approx(1.0)
    for reason in FINISH_REASONS:  # all four exported from the start
        want = 1 if reason == "length" else 0
        assert value(s, "mtnlg:request_success_total", finished_reason=reason) == want
    assert value(s, "mtnlg:request_errors_total", code="429") == 2
    assert value(s, "mtnlg:request_errors_total", code="400") == 1
    assert m._live == {}  # the finished request is forgotten


def test_unknown_keys_and_reasons():
    m = ServerMetrics("tiny")
    m.on_token("never-arrived", now=1.0)  # counted, no TTFT (no arrival time)
    m.on_token("never-arrived", now=1.5)  # inter-token latency still measured
    m.on_finish("never-arrived", "stop", now=2.0)  # no e2e sample, success counted
    m.on_finish("gone", "abort")
    s = samples(m)
    assert value(s, "mtnlg:generation_tokens_total") == 2
    assert value(s, "mtnlg:time_to_first_token_seconds_count") == 0
    assert value(s, "mtnlg:inter_token_latency_seconds_count") == 1
    assert value(s, "mtnlg:e2e_request_latency_seconds_count") == 0
    assert value(s, "mtnlg:request_success_total", finished_reason="stop") == 1
    assert value(s, "mtnlg:request_success_total", finished_reason="abort") == 1
    m.on_finish("x", "eos")  # not one of the four: its own label value, never an exception
    assert value(samples(m), "mtnlg:request_success_total", finished_reason="eos") == 1


def test_own_registries_and_threads():
    """Two instances do not share series; 8 threads x 200 requests add up exactly."""
    a, b = ServerMetrics("tiny"), ServerMetrics("tiny")
    b.on_admit(7)

    def client(i: int) -> None:
        for j in range(200):
            key = (i, j)
            a.on_arrival(key)
            a.on_admit(3)
            a.on_token(key)
            a.on_token(key)
            a.on_finish(key, "stop")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    s = samples(a)
    assert value(s, "mtnlg:prompt_tokens_total") == 8 * 200 * 3
    assert value(s, "mtnlg:generation_tokens_total") == 8 * 200 * 2
    assert value(s, "mtnlg:time_to_first_token_seconds_count") == 1600
    assert value(s, "mtnlg:inter_token_latency_seconds_count") == 1600
    assert value(s, "mtnlg:request_success_total", finished_reason="stop") == 1600
    assert a._live == {}
    assert value(samples(b), "mtnlg:prompt_tokens_total") == 7
