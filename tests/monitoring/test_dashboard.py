"""``launch/monitoring/grafana-dashboard.json`` queries only what the code exports: every
``mtnlg:`` name in every PromQL expression (panels and template variables) is a series of the
real ``TrainingExporter`` / ``ServerMetrics`` registries, every label it filters or groups by
exists, and every exported metric has a panel. ``prometheus.yml`` names both jobs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mtnlg.monitoring.serving import ServerMetrics
from mtnlg.monitoring.training import TrainingExporter

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "launch" / "monitoring" / "grafana-dashboard.json"
NAME = re.compile(r"mtnlg:[A-Za-z_][A-Za-z0-9_:]*")
TARGET_LABELS = {"job", "instance", "le"}
"""Labels Prometheus adds to every scraped series (``le``: histogram buckets)."""


def exported() -> tuple[dict[str, str], set[str]]:
    """(family name -> type, label names) from the real registries after one observation each;
    counters are listed as their ``_total`` sample."""
    train = TrainingExporter()
    train.observe(10, {"loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 9.0,
                       "tflops_per_gpu": 1.0, "mfu": 0.1, "loss_scale": 1.0,
                       "consumed_tokens": 640, "skipped_iters": 1})  # fmt: skip
    server = ServerMetrics("tiny")
    server.on_arrival("a", 0.0)
    server.on_admit(3)
    server.on_token("a", 0.1)
    server.on_token("a", 0.2)
    server.on_finish("a", "stop", 0.3)
    server.on_error(429)
    server.set_queue(1, 0)
    families, labels = {}, set()
    for registry in (train.registry, server.registry):
        for family in registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            families[name] = family.type
            labels |= {k for s in family.samples for k in s.labels}
    return families, labels


def expressions(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_dashboard_queries_name_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    families, labels = exported()
    assert "mtnlg:train_step_time_seconds" in families  # the registries were read, not a list
    used = set()
    exprs = expressions(dash)
    assert len(exprs) >= 20
    for expr in exprs:
        names = NAME.findall(expr)
        assert names, f"no mtnlg: metric in {expr!r}"
        for name in names:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if families.get(base) == "histogram":
                assert "histogram_quantile" not in expr or name.endswith("_bucket"), expr
                name = base
            assert name in families, f"{name!r} (in {expr!r}) is not exported by the code"
            used.add(name)
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                assert label in labels | TARGET_LABELS, f"label {label!r} in {expr!r}"
        for label in re.findall(r"[{,]\s*([A-Za-z_]+)\s*=~?", expr):
            assert label in labels | TARGET_LABELS, f"label {label!r} in {expr!r}"
    assert set(families) - used == set(), "exported metrics without a panel"


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for want in ("loss", "tokens/s", "tflop/s", "mfu", "skipped", "step time p50 / p99",
                 "requests finished", "time to first token", "inter-token", "end-to-end",
                 "running / waiting", "tokens per second"):  # fmt: skip
        assert want in titles, want
    for p in dash["panels"]:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["refId"] and t["expr"]


def test_prometheus_yml_names_both_jobs():
    text = (ROOT / "launch" / "monitoring" / "prometheus.yml").read_text()
    for want in ("job_name: mtnlg-train", "job_name: mtnlg-server", "metrics_path: /metrics",
                 "127.0.0.1:9100", "scrape_interval"):  # fmt: skip
        assert want in text, want
