"""Where a running server's time goes during a pass: CPU by part, and its model's batches.

    probe = ServerProbe(pid, metrics_port)   # before the pass
    ...                                      # the pass
    report = probe.report(wall_s)            # after it

CPU: the event loop (the main thread), each named thread kind (the server names its model and
decode threads; gRPC names its own), the rest, the decode worker processes, and the calling
process (the SDK, and the corpus host when it runs there). Batches, from the server's
Prometheus metrics: forward passes, their mean size, and the share of the wall time the model
threads spent in them (near 1 per instance, --instances: the model is the bottleneck; well
below: the pipeline feeding it).
"""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import psutil

BENCHMARK_PART = "benchmark (SDK + corpus)"


def free_port() -> int:
    """A free loopback port, for the server's --metrics-port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_by_part(proc: psutil.Process) -> dict[str, float]:
    """Cumulative CPU seconds of ``proc`` by part (see the module docstring)."""
    times = proc.cpu_times()
    parts = {"event loop": 0.0}
    for thread in proc.threads():
        if thread.id == proc.pid:
            parts["event loop"] = thread.user_time + thread.system_time
            continue
        try:
            name = Path(f"/proc/{proc.pid}/task/{thread.id}/comm").read_text().strip().rstrip("0123456789_-")
        except OSError:
            continue
        if not name.startswith("python"):  # an unnamed thread: it stays in "other threads"
            parts[name] = parts.get(name, 0.0) + thread.user_time + thread.system_time
    parts["other threads"] = times.user + times.system - sum(parts.values())
    parts["decode processes"] = sum(p.cpu_times().user + p.cpu_times().system for p in proc.children(recursive=True))
    me = psutil.Process().cpu_times()
    parts[BENCHMARK_PART] = me.user + me.system
    return parts


def batch_metrics(port: int) -> dict[str, float]:
    """Cumulative forward passes, items in them and seconds spent in them (every model)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals = {"forwards": 0.0, "items": 0.0, "seconds": 0.0}
    for line in text.splitlines():
        for prefix, key in (
            ("clipserve_batch_size_count", "forwards"),
            ("clipserve_batch_size_sum", "items"),
            ("clipserve_encode_seconds_sum", "seconds"),
        ):
            if line.startswith(prefix + "{"):
                totals[key] += float(line.rsplit(" ", 1)[1])
    return totals


class ServerProbe:
    def __init__(self, pid: int, metrics_port: int | None) -> None:
        self._proc = psutil.Process(pid)
        self._port = metrics_port
        self._cpu = cpu_by_part(self._proc)
        self._batches = batch_metrics(metrics_port) if metrics_port else None

    def report(self, wall_s: float) -> dict:
        cpu = {k: round(v - self._cpu.get(k, 0.0), 3) for k, v in cpu_by_part(self._proc).items()}
        out: dict = {"cpu_s": cpu}
        if self._port and self._batches is not None:
            now = batch_metrics(self._port)
            forwards, items, seconds = (now[k] - self._batches[k] for k in ("forwards", "items", "seconds"))
            out |= {
                "forwards": int(forwards),
                "mean_batch": round(items / forwards, 1) if forwards else 0.0,
                "model_busy": round(seconds / wall_s, 2),
            }
        return out


def describe(report: dict) -> str:
    """One line: the CPU of each part in cores over the pass, and the batches."""
    parts = ", ".join(
        f"{name} {seconds:.2f} s"
        for name, seconds in sorted(report["cpu_s"].items(), key=lambda kv: -kv[1])
        if seconds >= 0.005
    )
    batches = (
        (
            f"; {report['forwards']} forwards, mean batch {report['mean_batch']}, "
            f"model threads busy {report['model_busy']:.0%} of the wall"
        )
        if "forwards" in report
        else ""
    )
    return f"CPU {parts}{batches}"
