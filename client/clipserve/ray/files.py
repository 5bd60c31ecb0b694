"""``score-file`` / ``embed-file --engine ray``: the flags, and what a run needs around the
file tools: Ray joined, a fleet started (``--ray-replicas``) or the one at ``--address``, and
local stand-ins for the paths that are URIs (``s3://``, ``gs://``, ``hdfs://``, ``file://``:
whatever ``pyarrow.fs`` opens), copied in before the run and the outputs copied back after.

The file tools themselves are unchanged: they read the rows, write them in input order,
resume and summarise as with the SDK; each chunk of rows (``--chunk-size``) is one Ray Data
job (``RayEngine``). This module imports ray only when a run asks for it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import shlex
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._replicas import split_address
from ..files.rows import RunFailed

ENGINES = ("sdk", "ray")
CHUNK_ROWS = {"sdk": 1024, "ray": 65536}  # rows per chunk: one Ray Data job each, with its own actor pool
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$")  # what pathlib makes of "s3://b/k": "s3:/b/k"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --engine flags of score-file and embed-file."""
    group = parser.add_argument_group("running as a Ray Data job (--engine ray; needs clipserve[ray], docs/ray.md)")
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default="sdk",
        help="sdk: this process's client (default); ray: a Ray Data job whose actors each run a client",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help=(
            "the Ray cluster to join: 'auto' (the one this machine is part of), "
            "host:port, ray://... (default: $RAY_ADDRESS, else a Ray started for this run)"
        ),
    )
    group.add_argument(
        "--ray-replicas",
        type=int,
        default=0,
        metavar="N",
        help="start N `clipserve serve --model MODEL` replicas as Ray actors for the run, instead of --address",
    )
    group.add_argument(
        "--ray-gpus-per-replica",
        type=float,
        default=0,
        metavar="G",
        help="GPUs each replica of --ray-replicas takes (default: 0)",
    )
    group.add_argument(
        "--ray-cpus-per-replica",
        type=float,
        default=1,
        metavar="C",
        help="CPUs Ray reserves for each replica (default: 1)",
    )
    group.add_argument(
        "--ray-serve-flags",
        default="",
        metavar="FLAGS",
        help="more `clipserve serve` flags for the replicas, as one string, e.g. '--device cuda --dtype float16'",
    )
    group.add_argument(
        "--ray-actors",
        type=int,
        default=2,
        metavar="K",
        help="client actors (map_batches concurrency), one SDK client each (default: 2)",
    )
    group.add_argument(
        "--ray-cpus-per-actor",
        type=float,
        default=1,
        metavar="C",
        help="CPUs Ray reserves for each client actor (default: 1)",
    )
    group.add_argument(
        "--ray-batch-size", type=int, default=1024, metavar="B", help="rows per map_batches batch (default: 1024)"
    )


def uri_of(path: Path) -> str | None:
    """The URI a Path was made from (``Path("s3://b/k")`` reads ``s3:/b/k``); None for a local path."""
    match = _URI.match(str(path))
    if match is None:
        return None
    scheme, rest = match.groups()
    return f"file:///{rest}" if scheme == "file" else f"{scheme}://{rest}"


@contextlib.contextmanager
def staged(job: Any, keep_output: bool) -> Iterator[Any]:
    """The job with each URI path replaced by a local file: inputs copied in, the output (if
    ``keep_output``: --resume, --retry-failed) too; what the run wrote beside the output
    (the file, a ``.ids.jsonl``) is copied back when it ends, also when it failed half way,
    as a local output would be left for --resume."""
    uris = {
        f.name: uri_of(getattr(job, f.name)) for f in dataclasses.fields(job) if isinstance(getattr(job, f.name), Path)
    }
    remote = {name: uri for name, uri in uris.items() if uri is not None}
    if not remote:
        yield job
        return
    from pyarrow import fs

    with tempfile.TemporaryDirectory(prefix="clipserve-ray-") as folder:
        local: dict[str, Path] = {}
        for name, uri in remote.items():
            local[name] = Path(folder, "out" if name == "output" else name, uri.rsplit("/", 1)[-1])
            local[name].parent.mkdir(parents=True, exist_ok=True)
            if name != "output" or keep_output:
                _copy(fs, uri, local[name], missing_ok=name == "output")
        try:
            yield dataclasses.replace(job, **local)
        finally:
            if "output" in remote:
                target = remote["output"].rsplit("/", 1)[0]
                filesystem, path = fs.FileSystem.from_uri(target)
                filesystem.create_dir(path, recursive=True)  # a local folder must exist; object stores have none
                for written in local["output"].parent.iterdir():
                    if written.is_file():
                        fs.copy_files(str(written), f"{target}/{written.name}")


def _copy(fs: Any, uri: str, path: Path, *, missing_ok: bool) -> None:
    try:
        fs.copy_files(uri, str(path))
    except FileNotFoundError:
        if not missing_ok:
            raise RunFailed(f"{uri}: no such file") from None
    except OSError as exc:
        raise RunFailed(f"{uri}: {exc}") from None


@contextlib.contextmanager
def ray_engine(args: argparse.Namespace, job: Any, **client: Any) -> Iterator[tuple[Any, Any]]:
    """(the RayEngine, the job on local paths) for one file-tool run."""
    try:
        from .engine import RayEngine, connect
        from .fleet import Fleet
    except ImportError as exc:
        raise RunFailed(f"--engine ray needs the ray extra ({exc}): pip install 'clipserve[ray]'") from None
    if args.ray_replicas and args.address:
        raise RunFailed("give --address (a fleet that runs) or --ray-replicas (one started for the run), not both")
    connect(args.ray_address)
    client.pop("config", None)  # the job already holds what the SDK reads from it (col_name)
    for pem in ("root_certificates", "certificate_chain", "private_key"):
        if isinstance(client.get(pem), str):
            client[pem] = Path(client[pem]).read_bytes()  # the actors may run where the file is not
    keep_output = bool(getattr(args, "resume", False) or getattr(args, "retry_failed", False))
    with contextlib.ExitStack() as stack:
        if args.ray_replicas:
            fleet = Fleet(
                args.model or None,
                args.ray_replicas,
                num_gpus=args.ray_gpus_per_replica,
                num_cpus=args.ray_cpus_per_replica,
                flags=shlex.split(args.ray_serve_flags),
            )
            try:
                address, model = stack.enter_context(fleet), ""  # the replicas' own default model: --model's
            except RuntimeError as exc:
                raise RunFailed(f"the fleet did not start: {exc}") from None
        else:
            address, model = ",".join(split_address(args.address)), args.model
        local_job = stack.enter_context(staged(job, keep_output))
        engine = RayEngine(
            address,
            model=model,
            batch_size=args.ray_batch_size,
            concurrency=args.ray_actors,
            num_cpus=args.ray_cpus_per_actor,
            **client,
        )
        stack.enter_context(engine)
        yield engine, local_job
