"""The trainer's Prometheus exporter: ``--metrics-port`` on rank 0 (off by default).

``MetricsLogger`` (``mtnlg.training.metrics``) feeds it the same record it writes to the JSON
Lines file and TensorBoard, at every log interval, so pretraining, fine-tuning and distillation
all export without code of their own. What a record carries becomes:

====================================================  =========  ==========================
metric                                                type       from the logged field
====================================================  =========  ==========================
``mtnlg:train_loss``                                  gauge      ``loss``
``mtnlg:train_lr``                                    gauge      ``lr``
``mtnlg:train_grad_norm``                             gauge      ``grad_norm``
``mtnlg:train_tokens_per_second``                     gauge      ``tokens_per_sec``
``mtnlg:train_tflops``                                gauge      ``tflops_per_gpu`` (per device)
``mtnlg:train_mfu``                                   gauge      ``mfu`` (a fraction)
``mtnlg:train_loss_scale``                            gauge      ``loss_scale``
``mtnlg:train_last_step_timestamp_seconds``           gauge      wall clock of the record
``mtnlg:train_iterations_total``                      counter    ``iteration``
``mtnlg:train_consumed_tokens_total``                 counter    ``consumed_tokens``
``mtnlg:train_skipped_steps_total``                   counter    ``skipped_iters``
``mtnlg:train_step_time_seconds``                     histogram  wall time / iterations
====================================================  =========  ==========================

A metric appears with its field's first number: a field the run never logs (fine-tuning logs
no tokens/s, no MFU without ``--peak-tflops``) exports no series rather than a false 0, and a
None (``grad_norm`` under some ZeRO stages) leaves the last value. Counters grow by the
difference of the logged running totals, so they never decrease: a process starts them at the
totals of the run it continues (``rate()`` takes the first scrape as its origin, so a resumed
run shows no spike). The step time histogram gets the mean of each log window once per
iteration in it (so its ``_count`` is the iteration count and its ``_sum`` the wall time);
``--log-interval 1`` for per-step resolution. The window's wall time includes evaluation and
checkpoints, as tokens/s does.

Prometheus pulls: it reads the endpoint every ``scrape_interval``, so a run that ends before
the next scrape loses its last values. ``--metrics-linger SECONDS`` keeps the endpoint up that
long after a run that ended normally (SIGTERM or SIGINT ends the wait at once, exit status 0).
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

STEP_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
"""Seconds per optimizer step: a tiny CPU model (ms) up to a 530B model's minutes."""

GAUGES = {
    "loss": ("train_loss", "training loss of the last logged iteration"),
    "lr": ("train_lr", "learning rate of the last logged iteration"),
    "grad_norm": ("train_grad_norm", "global gradient norm of the last logged iteration"),
    "tokens_per_sec": ("train_tokens_per_second", "training tokens per second, whole job"),
    "tflops_per_gpu": ("train_tflops", "model TFLOP/s per device"),
    "mfu": ("train_mfu", "model FLOPs utilisation, a fraction of --peak-tflops"),
    "loss_scale": ("train_loss_scale", "fp16 dynamic loss scale"),
}
"""Logged field -> (metric name after ``mtnlg:``, help)."""

COUNTERS = {
    "iteration": ("train_iterations", "optimizer steps taken"),
    "consumed_tokens": ("train_consumed_tokens", "training tokens consumed"),
    "skipped_iters": ("train_skipped_steps", "steps skipped (non-finite loss or gradients)"),
}
"""Logged running total -> (counter name after ``mtnlg:``, without ``_total``; help)."""


class TrainingExporter:
    """Training metrics in an own registry; :meth:`serve` opens the HTTP endpoint.

    ``log_interval``: iterations in the first window of a process (the iteration it resumed
    from is not logged), for the step time of that window."""

    def __init__(self, log_interval: int = 1, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.gauges: dict[str, Gauge] = {}
        self.counters: dict[str, Counter] = {}
        """Created at their field's first number: a field the run never logs is no series."""
        self.last_step = Gauge(
            "mtnlg:train_last_step_timestamp_seconds",
            "Unix time of the last logged iteration",
            registry=self.registry,
        )
        self.step_time = Histogram(
            "mtnlg:train_step_time_seconds",
            "wall time per optimizer step (mean of each log window)",
            buckets=STEP_TIME_BUCKETS,
            registry=self.registry,
        )
        self._totals = dict.fromkeys(COUNTERS, 0.0)
        self._log_interval = max(1, int(log_interval))
        self._t = time.monotonic()
        self._first = True
        self._httpd = None
        self.url: str | None = None

    def observe(self, iteration: int, fields: dict) -> None:
        """One logged record: ``fields`` as ``MetricsLogger.log_train`` got them (plain numbers)."""
        now = time.monotonic()
        for key, (name, doc) in GAUGES.items():
            if _number(fields.get(key)):
                if key not in self.gauges:
                    self.gauges[key] = Gauge(f"mtnlg:{name}", doc, registry=self.registry)
                self.gauges[key].set(fields[key])
        self.last_step.set(time.time())
        totals = {**{k: fields.get(k) for k in COUNTERS}, "iteration": iteration}
        steps = 0
        for key, (name, doc) in COUNTERS.items():
            if not _number(totals[key]):
                continue
            if key not in self.counters:
                self.counters[key] = Counter(f"mtnlg:{name}", doc, registry=self.registry)
            delta = totals[key] - self._totals[key]
            if delta > 0:  # a total that went back (none should) leaves the counter as is
                self.counters[key].inc(delta)
                self._totals[key] = totals[key]
            if key == "iteration":
                steps = int(max(delta, 0))
        if self._first:  # the first window of this process: the logged interval at most
            steps = min(steps, self._log_interval)
            self._first = False
        if steps > 0:
            mean = (now - self._t) / steps
            for _ in range(steps):  # one sample per step: _count is the iteration count
                self.step_time.observe(mean)
        self._t = now

    def serve(self, port: int, host: str = "127.0.0.1") -> str:
        """Open ``http://host:port/metrics`` on a daemon thread; the URL. A port in use (or a
        host this machine does not have) is a ``SystemExit`` naming ``--metrics-port``."""
        try:
            self._httpd = serve_text_format(self.registry, port, host)
        except (OSError, OverflowError) as e:  # in use, no such address, not in 0-65535
            raise SystemExit(
                f"error: --metrics-port {port} --metrics-host {host}: cannot listen there ({e}); "
                "choose a free port (or leave --metrics-port out)"
            ) from None
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self._httpd.server_address[1]}/metrics"
        return self.url

    def linger(self, seconds: float) -> None:
        """Keep serving ``seconds`` more (Prometheus pulls: its next scrape reads the final
        values); SIGTERM or SIGINT ends the wait early and normally."""
        if self._httpd is None or seconds <= 0:
            return
        stop = threading.Event()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
        print(
            f"metrics: {self.url} stays up {seconds:g} s (--metrics-linger; SIGTERM ends it)",
            file=sys.stderr,
            flush=True,
        )
        try:
            deadline = time.monotonic() + seconds
            while not stop.is_set() and time.monotonic() < deadline:
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def close(self) -> None:
        """Stop the endpoint (the metrics stay readable through :attr:`registry`)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def serve_text_format(registry: CollectorRegistry, port: int, host: str) -> WSGIServer:
    """``prometheus_client.start_http_server`` that always answers the classic text format.

    prometheus_client 0.26 answers a scraper that accepts OpenMetrics (every Prometheus since
    2.5 asks for it first) with the sample lines renamed ``mtnlg:x`` -> ``mtnlg_x`` while the
    ``# TYPE`` lines keep the colon (prometheus/client_python#1177), so Prometheus would store
    none of the ``mtnlg:`` names; the text format 0.0.4 keeps them. Same daemon thread and quiet
    handler as ``start_http_server``."""
    app = make_wsgi_app(registry)

    def text_only(environ, start_response):
        return app({**environ, "HTTP_ACCEPT": "text/plain; version=0.0.4"}, start_response)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(host, port, text_only, Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:
        """No line per scrape on stderr."""
