"""The inference server's Prometheus metrics, as vLLM names them but under ``mtnlg:``.

================================================  =========  ====================================
metric (every one labelled ``model_name``)        type       fed by
================================================  =========  ====================================
``mtnlg:num_requests_running``                    gauge      :meth:`ServerMetrics.set_queue`
``mtnlg:num_requests_waiting``                    gauge      :meth:`ServerMetrics.set_queue`
``mtnlg:prompt_tokens_total``                     counter    :meth:`ServerMetrics.on_admit`
``mtnlg:generation_tokens_total``                 counter    :meth:`ServerMetrics.on_token`
``mtnlg:time_to_first_token_seconds``             histogram  arrival -> first token
``mtnlg:inter_token_latency_seconds``             histogram  token -> next token
``mtnlg:e2e_request_latency_seconds``             histogram  arrival -> finish
``mtnlg:request_success_total{finished_reason}``  counter    :meth:`ServerMetrics.on_finish`
``mtnlg:request_errors_total{code}``              counter    :meth:`ServerMetrics.on_error`
================================================  =========  ====================================

``finished_reason`` is one of :data:`FINISH_REASONS` (all four exported from the start, at 0, so
``rate()`` sees them before the first such request); ``code`` is the HTTP status of a 4xx/5xx
answer. The buckets are vLLM's. Times are seconds on any one clock the caller keeps to
(``time.monotonic()`` when ``now`` is left out). Every method is O(1) and thread-safe: the
server's worker thread calls them while the HTTP thread renders ``/metrics``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

FINISH_REASONS = ("stop", "length", "abort", "error")
"""``finished_reason`` label values: OpenAI's ``stop`` / ``length``, a client that went away
(``abort``), a request the engine failed (``error``)."""

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


def _now(now: float | None) -> float:
    return time.monotonic() if now is None else now


class ServerMetrics:
    """The server's metrics in an own registry, every series labelled ``model_name``.

    Per request (``key``: anything hashable and unique while the request lives, e.g. its id)::

        on_arrival(key, now)      # the request reached the server
        on_admit(prompt_tokens)   # it entered the batch (prefill)
        on_token(key, now)        # each generated token: TTFT first, inter-token latency after
        on_finish(key, reason, now)

    and ``set_queue(running, waiting)`` whenever the queue changes, ``on_error(status)`` for
    every 4xx/5xx answer. A key ``on_finish`` never sees stays in memory: finish every request.
    """

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        r, m, name = self.registry, ("model_name",), model_name
        # the families' children are bound once: no label lookup per token
        self.running = Gauge("mtnlg:num_requests_running", "requests in the batch", m,
                             registry=r).labels(name)  # fmt: skip
        self.waiting = Gauge("mtnlg:num_requests_waiting", "requests queued", m,
                             registry=r).labels(name)  # fmt: skip
        self.prompt_tokens = Counter("mtnlg:prompt_tokens", "prefilled prompt tokens", m,
                                     registry=r).labels(name)  # fmt: skip
        self.generation_tokens = Counter("mtnlg:generation_tokens", "generated tokens", m,
                                         registry=r).labels(name)  # fmt: skip
        self.ttft = Histogram("mtnlg:time_to_first_token_seconds", "arrival to first token", m,
                              registry=r, buckets=TTFT_BUCKETS).labels(name)  # fmt: skip
        self.itl = Histogram("mtnlg:inter_token_latency_seconds", "time between tokens", m,
                             registry=r, buckets=ITL_BUCKETS).labels(name)  # fmt: skip
        self.e2e = Histogram("mtnlg:e2e_request_latency_seconds", "arrival to finish", m,
                             registry=r, buckets=E2E_BUCKETS).labels(name)  # fmt: skip
        self._success = Counter("mtnlg:request_success", "finished requests by reason",
                                ("model_name", "finished_reason"), registry=r)  # fmt: skip
        self.success = {reason: self._success.labels(name, reason) for reason in FINISH_REASONS}
        self._errors = Counter("mtnlg:request_errors", "4xx/5xx answers by status code",
                               ("model_name", "code"), registry=r)  # fmt: skip
        self._lock = threading.Lock()
        self._live: dict[Hashable, list[float | None]] = {}
        """key -> [arrival time, last token time (None before the first)]."""

    def set_queue(self, running: int, waiting: int) -> None:
        """Requests now in the batch and waiting for a slot."""
        self.running.set(running)
        self.waiting.set(waiting)

    def on_arrival(self, key: Hashable, now: float | None = None) -> None:
        """Request ``key`` arrived: the origin of its TTFT and end-to-end latency."""
        with self._lock:
            self._live[key] = [_now(now), None]

    def on_admit(self, prompt_tokens: int) -> None:
        """A request entered the batch with ``prompt_tokens`` to prefill."""
        self.prompt_tokens.inc(prompt_tokens)

    def on_token(self, key: Hashable, now: float | None = None, count: int = 1) -> None:
        """``count`` tokens of ``key`` generated at ``now`` (one latency sample per call)."""
        now = _now(now)
        self.generation_tokens.inc(count)
        with self._lock:
            times = self._live.setdefault(key, [None, None])
            arrival, last = times
            times[1] = now
        if last is not None:
            self.itl.observe(now - last)
        elif arrival is not None:
            self.ttft.observe(now - arrival)

    def on_finish(self, key: Hashable, reason: str, now: float | None = None) -> None:
        """``key`` finished (``reason``: one of :data:`FINISH_REASONS`; another gets its own
        label value rather than an exception in the server's worker); the key is forgotten."""
        now = _now(now)
        with self._lock:
            arrival, _ = self._live.pop(key, (None, None))
            counter = self.success.get(reason)
            if counter is None:
                counter = self.success[reason] = self._success.labels(self.model_name, reason)
        counter.inc()
        if arrival is not None:
            self.e2e.observe(now - arrival)

    def on_error(self, status_code: int) -> None:
        """An answer with HTTP status ``status_code`` (4xx/5xx) was sent."""
        self._errors.labels(self.model_name, str(int(status_code))).inc()

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of ``GET /metrics``: the classic text format 0.0.4, whatever
        the scraper accepts. Not OpenMetrics: prometheus_client 0.26 renames ``mtnlg:x`` to
        ``mtnlg_x`` in its OpenMetrics sample lines (prometheus/client_python#1177), so serve
        this, not ``make_asgi_app``."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
