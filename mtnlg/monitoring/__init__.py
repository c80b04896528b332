"""Prometheus metrics: the trainer's exporter (``training``) and the server's (``serving``).

Both keep their metrics in their own ``CollectorRegistry`` (never the process-global one), so
several exporters can live in one process (tests) and nothing else leaks into the scrape. Every
name starts with ``mtnlg:``; the server's follow vLLM's names (``vllm:`` -> ``mtnlg:``), so
dashboards written for vLLM need only the prefix changed. ``launch/monitoring/`` holds a
``prometheus.yml`` and a Grafana dashboard that query exactly these names.
"""
