"""A fleet of ``clipserve serve`` processes, each kept by a Ray actor.

Ray places each actor (``num_gpus`` per replica, spread over the nodes); the actor starts the
server on a free port of its node and keeps it running: a server process that dies is
started again by its actor **on the same port**, so the fleet's address list never changes
and the SDK, which keeps a connection per replica and sends a dead replica's unanswered
pairs to the others, simply finds it again once it answers. The servers die with their
actor (``PR_SET_PDEATHSIG``) and are stopped when the fleet is left: none outlives it.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT_S = 600.0  # a replica's start: imports, the model's download and load, conversion
STOP_TIMEOUT_S = 60.0  # a server's grace to stop on SIGTERM before it is killed
_HEALTH_POLL_S = 0.5
_RESTART_PAUSE_S = 1.0
_FAILED_STARTS = 3  # starts in a row that die before serving, after which a replica gives up
_LOG_LINES = 200  # the last lines of a server's output, kept for error messages
_LISTENING = "clipserve listening on "


def _die_with_parent() -> None:
    """In the server's process before exec: SIGTERM it when the actor's thread that
    started it (the keeper, which lives as long as the actor) goes, however it goes."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def serving(address: str, timeout: float) -> bool:
    """Whether the server at ``address`` answers SERVING to gRPC's standard health check."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class ReplicaKeeper:
    """One server process, started again whenever it dies (a Ray actor: ``_Replica``)."""

    def __init__(self, command: Sequence[str], host: str | None = None) -> None:
        self._command = list(command)
        self.host = host or ray.util.get_node_ip_address()
        self.port = 0  # 0 until the first start has bound one; the same port ever after
        self.restarts = 0
        self.error: str | None = None  # set when the replica gave up
        self._proc: subprocess.Popen[str] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=_LOG_LINES)
        self._changed = threading.Condition()
        self._stopping = False
        self._keeper = threading.Thread(target=self._keep, name="clipserve-replica", daemon=True)
        self._keeper.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_serving(self, timeout: float = START_TIMEOUT_S) -> str:
        """The replica's address once it answers SERVING; raises RuntimeError (with the end
        of its output) if it gave up or did not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._changed:
                if self.error is not None:
                    raise RuntimeError(self.error)
                if not self.port:
                    self._changed.wait(_HEALTH_POLL_S)
                    continue
            if serving(self.address, timeout=_HEALTH_POLL_S * 4):
                return self.address
            time.sleep(_HEALTH_POLL_S)
        raise RuntimeError(f"clipserve serve was not SERVING within {timeout:.0f}s:\n{self.log_tail()}")

    def pid(self) -> int | None:
        """The server process's id (it changes when the server is restarted)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def status(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "pid": self.pid(),
            "restarts": self.restarts,
            "error": self.error,
            "actor_pid": os.getpid(),
        }

    def log_tail(self) -> str:
        return "".join(self._log)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); its exit code."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._keeper.join(timeout=10)
        return proc.returncode

    # -- the keeper thread ---------------------------------------------------------------------
    def _keep(self) -> None:
        failed_starts = 0
        while True:
            with self._changed:
                if self._stopping:
                    return
                port = self.port
                self._proc = proc = subprocess.Popen(
                    [*self._command, "--host", self.host, "--port", str(port)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    preexec_fn=_die_with_parent,  # with the keeper thread: it lives as long as the actor
                )
            listened = self._drain(proc)
            code = proc.wait()
            with self._changed:
                if self._stopping:
                    return
                failed_starts = 0 if listened else failed_starts + 1
                if not self.port or failed_starts >= _FAILED_STARTS:
                    self.error = f"clipserve serve exited ({code}) before serving:\n{self.log_tail()}"
                    self._changed.notify_all()
                    return
                self.restarts += 1
                self._log.append(f"[clipserve.ray] the server exited ({code}); starting it again on port {self.port}\n")
                self._changed.wait(_RESTART_PAUSE_S)  # a server that crashes at once does not spin; stop() wakes it

    def _drain(self, proc: subprocess.Popen[str]) -> bool:
        """Keep the server's last lines (its pipe must never fill); True if it listened."""
        assert proc.stdout is not None
        listened = False
        for line in proc.stdout:
            self._log.append(line)
            if line.startswith(_LISTENING) and not listened:
                listened = True
                with self._changed:
                    self.port = self.port or int(line.strip().rsplit(":", 1)[1])
                    self._changed.notify_all()
        return listened


class Fleet:
    """N ``clipserve serve`` replicas as Ray actors; ``with Fleet(...) as address``.

    Args:
        model: what ``clipserve serve --model`` takes (a Hugging Face id, a path, ``fake:...``);
            None to give it in ``flags`` (``["--config", "config.toml"]``).
        replicas: how many servers.
        num_gpus: GPUs per replica (0 or 1): Ray places each where one is free and sets its
            ``CUDA_VISIBLE_DEVICES``.
        num_cpus: CPUs Ray reserves per replica (image decoding runs on them); 0 reserves none.
        flags: more ``clipserve serve`` flags, e.g. ``["--max-batch-size", "64"]``; not
            ``--host`` / ``--port``, which the actor sets.
        start_timeout_s: how long each replica may take to answer SERVING.
        ray_remote_args: more options for the actors (``resources``, ``runtime_env``,
            ``scheduling_strategy``; by default Ray spreads them over the nodes).

    Entering starts every replica and waits until each answers SERVING to gRPC's health check;
    it yields their addresses as ``"host:port,host:port"`` (what ``clipserve.CLIP``,
    ``ScoreBatches`` and ``EmbedBatches`` take). A server that dies is started again by its
    actor on the same port, so the address stays valid for the whole job. Leaving stops every
    server (SIGTERM, then SIGKILL) and every actor.
    """

    def __init__(
        self,
        model: str | None,
        replicas: int = 1,
        *,
        num_gpus: float = 0,
        num_cpus: float = 1,
        flags: Sequence[str] = (),
        start_timeout_s: float = START_TIMEOUT_S,
        ray_remote_args: dict[str, Any] | None = None,
    ) -> None:
        if replicas < 1:
            raise ValueError("a fleet needs at least one replica")
        self.command = [sys.executable, "-m", "clipserve.cli", "serve", *(["--model", model] if model else []), *flags]
        self.replicas = replicas
        self.start_timeout_s = start_timeout_s
        self._options = {"num_gpus": num_gpus, "num_cpus": num_cpus, "scheduling_strategy": "SPREAD",
            # Threaded: status() and stop() answer while wait_serving() waits. Not restarted:
            # an actor that dies (its node lost) took its server with it; the SDK sends that
            # replica's pairs to the others.
            "max_concurrency": 4, "max_restarts": 0, **(ray_remote_args or {})}
        self.actors: list[Any] = []
        self.address = ""

    def start(self) -> str:
        """Start every replica; their address list once all are SERVING."""
        actor_class = ray.remote(ReplicaKeeper).options(**self._options)
        self.actors = [actor_class.remote(self.command) for _ in range(self.replicas)]
        try:
            addresses = ray.get([actor.wait_serving.remote(self.start_timeout_s) for actor in self.actors])
        except BaseException:
            self.stop()
            raise
        self.address = ",".join(addresses)
        return self.address

    def status(self) -> list[dict[str, Any]]:
        """Each replica's address, server process id (``pid``), restarts so far, error, and
        its actor's process id (``actor_pid``)."""
        return list(ray.get([actor.status.remote() for actor in self.actors]))

    def stop(self) -> None:
        """Stop every server, then its actor."""
        stopping = [actor.stop.remote() for actor in self.actors]
        try:
            ray.get(stopping, timeout=STOP_TIMEOUT_S + 30)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            pass  # an actor already gone took its server with it (PR_SET_PDEATHSIG)
        finally:
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
