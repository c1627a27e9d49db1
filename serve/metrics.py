"""splitvlm's counters on vLLM's /metrics: summed over the server's processes at each scrape."""

from __future__ import annotations

_registered: set[str] = set()


class CountsCollector:
    """A Prometheus collector reading the counter files of one server's run folder."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        from splitvlm.serve.settings import COUNTERS, read_counts

        totals = read_counts(self.run_dir)
        for name, help_text in COUNTERS.items():
            yield CounterMetricFamily(f"splitvlm_{name}", help_text, value=totals[name])


def register_collector(run_dir: str) -> None:
    """Add the counters to prometheus_client's default registry, which vLLM's /metrics serves
    with one API server (with --api-server-count > 1 vLLM uses a multiprocess registry)."""
    if not run_dir or run_dir in _registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(CountsCollector(run_dir))
    _registered.add(run_dir)
