"""Prometheus metrics, in a registry of the server's own (so tests can run several servers).

Whatever is per model carries a ``model`` label: the model's name on this server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# With --metrics-host-labels, hosts that get a label of their own in the fetch metrics; later
# ones share "other", so that a benchmark over thousands of hosts does not make thousands of
# series. Without it every host is "all": the hosts are the callers' data.
FETCH_HOST_LABELS = 50
ALL_HOSTS = "all"
# Attempts that reached no host (a forbidden or malformed URL, a name that does not resolve)
# never earn a host a label: any caller could spend the labels on made-up names.
_REFUSED = frozenset({"forbidden", "invalid", "dns_error"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# (name, engine) for every loaded model: what the registry's ``engines()`` gives.
Engines = Callable[[], list[tuple[str, Any]]]


class _EngineCollector(Collector):
    """Reads queue depths, cache statistics and model descriptions at scrape time, so nothing
    is double-booked."""

    def __init__(self, engines: Engines) -> None:
        self._engines = engines

    def collect(self) -> Iterator:
        depth = GaugeMetricFamily("clipserve_queue_depth", "Texts and images waiting for the model", labels=["model"])
        entries = GaugeMetricFamily("clipserve_cache_entries", "Embeddings held", labels=["model", "cache"])
        hits = CounterMetricFamily(
            "clipserve_cache_hits", "Lookups served without a new encode", labels=["model", "cache"]
        )
        misses = CounterMetricFamily(
            "clipserve_cache_misses", "Lookups that needed an encode", labels=["model", "cache"]
        )
        forwards = CounterMetricFamily(
            "clipserve_instance_forwards",
            "Forward passes run, per model instance",
            labels=["model", "device", "instance"],
        )
        items = CounterMetricFamily(
            "clipserve_instance_items",
            "Texts plus images encoded, per model instance",
            labels=["model", "device", "instance"],
        )
        busy = CounterMetricFamily(
            "clipserve_instance_busy_seconds",
            "Seconds spent in forward passes, per model instance",
            labels=["model", "device", "instance"],
        )
        up = GaugeMetricFamily(
            "clipserve_instance_up",
            "1 while a model instance can run forward passes",
            labels=["model", "device", "instance"],
        )
        info = GaugeMetricFamily(
            "clipserve_model_info",
            "The loaded models",
            labels=["model", "model_id", "backend", "device", "dtype", "embedding_dim", "compiled"],
        )
        for model, engine in self._engines():
            depth.add_metric([model], engine.queue_depth)
            for cache, stats in zip(("text", "image"), engine.cache_stats()):
                entries.add_metric([model, cache], stats.entries)
                hits.add_metric([model, cache], stats.hits)
                misses.add_metric([model, cache], stats.misses)
            for instance in engine.instance_stats():
                labels = [model, instance.device, str(instance.index)]
                forwards.add_metric(labels, instance.forwards)
                items.add_metric(labels, instance.items)
                busy.add_metric(labels, instance.busy_s)
                up.add_metric(labels, int(instance.alive))
            d = engine.description
            info.add_metric(
                [model, d.model_id, d.backend, engine.device, d.dtype, str(d.embedding_dim), str(d.compiled).lower()], 1
            )
        yield from (depth, entries, hits, misses, forwards, items, busy, up, info)


class Metrics:
    def __init__(self, *, host_labels: bool = False) -> None:
        """``host_labels``: the fetch metrics name the image hosts (--metrics-host-labels)."""
        self._host_labels = host_labels
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter("clipserve_requests", "RPCs by method and final status code", ["rpc", "code"], registry=r)
        self.items = Counter(
            "clipserve_items",
            "Items answered (pairs scored, inputs embedded), by RPC, status code and model",
            ["rpc", "code", "model"],
            registry=r,
        )
        self.item_seconds = Histogram(
            "clipserve_item_latency_seconds",
            "Per item, from arrival to answer",
            ["rpc", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "clipserve_batch_size",
            "Texts plus images per forward pass",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.encode_seconds = Histogram(
            "clipserve_encode_seconds", "Duration of one forward pass", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.upload_bytes = Counter("clipserve_upload_bytes", "Image bytes received in requests (uploads)", registry=r)
        self.bytes_requested = Counter(
            "clipserve_image_bytes_requested",
            "Items named by image_sha256 alone that were answered IMAGE_BYTES_NEEDED",
            registry=r,
        )
        self.fetch_failures = Counter(
            "clipserve_fetch_failures", "Image downloads that failed, by reason", ["reason"], registry=r
        )
        self.fetch_attempts = Counter(
            "clipserve_fetch_attempts",
            "Download attempts (retries included) by host and outcome (ok, http_503, reset, timeout...)",
            ["host", "outcome"],
            registry=r,
        )
        self.fetch_retries = Counter(
            "clipserve_fetch_retries", "Downloads tried again after a transient failure, by host", ["host"], registry=r
        )
        # The HTTP face (serving/http/): per route and status, as clipserve_requests is per RPC and code.
        self.http_requests = Counter(
            "clipserve_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "clipserve_http_request_seconds",
            "Per HTTP request, from its headers to its answer",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.fetch_retry_after_seconds = Counter(
            "clipserve_fetch_retry_after_seconds",
            "Seconds waited before retries because the host's Retry-After asked, by host",
            ["host"],
            registry=r,
        )
        self._fetch_hosts: set[str] = set()
        # The labelled children every item updates, looked up once: prometheus_client's
        # ``labels()`` validates and locks on each call (~4% of a cold pass's event loop).
        self._item_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def item_answered(self, rpc: str, code: str, model: str, seconds: float) -> None:
        """One item answered by ``rpc`` with status ``code`` after ``seconds``."""
        key = (rpc, code, model)
        children = self._item_children.get(key)
        if children is None:
            children = self._item_children[key] = (
                self.items.labels(rpc=rpc, code=code, model=model),
                self.item_seconds.labels(rpc=rpc, model=model),
            )
        children[0].inc()
        children[1].observe(seconds)

    def fetch_attempt(self, host: str, outcome: str) -> None:
        """One download attempt ended (``images.fetch_events.FetchEvents``)."""
        self.fetch_attempts.labels(host=self._host_label(host, earns=outcome not in _REFUSED), outcome=outcome).inc()

    def fetch_retry(self, host: str, wait_s: float, retry_after: bool) -> None:
        label = self._host_label(host, earns=False)  # the attempt before it said whether the host earned one
        self.fetch_retries.labels(host=label).inc()
        if retry_after:
            self.fetch_retry_after_seconds.labels(host=label).inc(wait_s)

    def _host_label(self, host: str, *, earns: bool) -> str:
        """``host``'s label; ``earns``: it may get one of its own now, if any are left."""
        if not self._host_labels:
            return ALL_HOSTS
        if host in self._fetch_hosts:
            return host
        if earns and len(self._fetch_hosts) < FETCH_HOST_LABELS:
            self._fetch_hosts.add(host)
            return host
        return "other"

    def batch_observer(self, model: str) -> Callable[[int, float], None]:
        """What a model's batcher calls after each forward pass: (items, seconds)."""
        size, seconds = self.batch_size.labels(model=model), self.encode_seconds.labels(model=model)

        def observe(items: int, took: float) -> None:
            size.observe(items)
            seconds.observe(took)

        return observe

    def attach(self, engines: Engines) -> None:
        self.registry.register(_EngineCollector(engines))

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics over HTTP (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
