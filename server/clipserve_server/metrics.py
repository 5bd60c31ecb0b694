"""Prometheus metrics, in a registry of the server's own (so tests can run several servers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .domain import CacheStats, ModelDescription

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _EngineCollector(Collector):
    """Reads queue depth and cache statistics at scrape time, so nothing is double-booked."""

    def __init__(self, queue_depth: Callable[[], int], caches: Callable[[], tuple[CacheStats, CacheStats]]) -> None:
        self._queue_depth = queue_depth
        self._caches = caches

    def collect(self) -> Iterator:
        yield GaugeMetricFamily("clipserve_queue_depth", "Texts and images waiting for the model", value=self._queue_depth())
        entries = GaugeMetricFamily("clipserve_cache_entries", "Embeddings held", labels=["cache"])
        hits = CounterMetricFamily("clipserve_cache_hits", "Lookups served without a new encode", labels=["cache"])
        misses = CounterMetricFamily("clipserve_cache_misses", "Lookups that needed an encode", labels=["cache"])
        for name, stats in zip(("text", "image"), self._caches()):
            entries.add_metric([name], stats.entries)
            hits.add_metric([name], stats.hits)
            misses.add_metric([name], stats.misses)
        yield from (entries, hits, misses)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter("clipserve_requests", "RPCs by method and final status code", ["rpc", "code"], registry=r)
        self.items = Counter("clipserve_items", "Pairs answered, by RPC and status code", ["rpc", "code"], registry=r)
        self.item_seconds = Histogram("clipserve_item_latency_seconds", "Per pair, from arrival to answer", ["rpc"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("clipserve_batch_size", "Texts plus images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.encode_seconds = Histogram("clipserve_encode_seconds", "Duration of one forward pass", buckets=_LATENCY_BUCKETS, registry=r)
        self.upload_bytes = Counter("clipserve_upload_bytes", "Image bytes received in requests (uploads)", registry=r)
        self.bytes_requested = Counter("clipserve_image_bytes_requested", "Items named by image_sha256 alone that were answered IMAGE_BYTES_NEEDED", registry=r)
        self.fetch_failures = Counter("clipserve_fetch_failures", "Image downloads that failed, by reason", ["reason"], registry=r)
        self.model = Info("clipserve_model", "The loaded model", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.encode_seconds.observe(seconds)

    def attach(self, description: ModelDescription, queue_depth: Callable[[], int], caches: Callable[[], tuple[CacheStats, CacheStats]]) -> None:
        self.model.info({"model_id": description.model_id, "device": description.device, "dtype": description.dtype, "embedding_dim": str(description.embedding_dim), "compiled": str(description.compiled).lower()})
        self.registry.register(_EngineCollector(queue_depth, caches))

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics over HTTP (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
