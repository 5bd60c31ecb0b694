"""The ``clipserve`` command: ``serve``, ``score``, ``health``, ``info``, ``models``,
``score-file``, ``embed-file``, ``report``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from ._pipes import quiet_on_closed_pipe
from .files.flags import add_columns_and_images
from .ray import files as ray_files  # no ray imported: its flags, and --engine ray
from .report import command as report_command

_SERVER_MODULES = ("torch", "transformers", "PIL", "aiohttp", "grpc_reflection")


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="server host:port, a dns:/// target, or several host:port separated by commas "
        "(default: $CLIPSERVE_ADDRESS or localhost:50051)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default: 30)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    parser.add_argument("--tls-ca", default=None, help="PEM CA bundle that signed the server certificate")
    parser.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", default=None, help="PEM client key (mutual TLS)")
    parser.add_argument(
        "--auth-token-file", default=None, help="file holding the bearer token (default: $CLIPSERVE_AUTH_TOKEN)"
    )


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="",
        help="which of the server's models (see `clipserve models`; default: the server's default)",
    )


def _security(args: argparse.Namespace) -> dict:
    token = open(args.auth_token_file, encoding="utf-8").read().strip() if args.auth_token_file else None
    return {
        "tls": args.tls,
        "root_certificates": args.tls_ca,
        "certificate_chain": args.tls_cert,
        "private_key": args.tls_key,
        "auth_token": token,
    }


def _connection(args: argparse.Namespace):
    from ._channel import Connection
    from ._replicas import Discovery, split_address

    discovery = Discovery(split_address(args.address))
    return Connection(discovery.display, **_security(args)), discovery.replicas()


def _cmd_serve(argv: list[str]) -> int:
    missing = []
    for module in _SERVER_MODULES:
        try:
            importlib.import_module(module)  # the server imports them anyway
        except ImportError:
            missing.append(module)
    if missing:
        print(
            f"clipserve serve needs the server extra (missing: {', '.join(missing)}): "
            "pip install 'clipserve[server]'",
            file=sys.stderr,
        )
        return 2
    from clipserve_server.cli import main as serve_main

    return serve_main(argv)


def _cmd_score(args: argparse.Namespace) -> int:
    from . import CLIP, ClipServeError

    with CLIP(args.address, timeout=args.timeout, model=args.model, **_security(args)) as clip:
        try:
            print(clip.score(args.query, args.image))
        except ClipServeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    connection, replicas = _connection(args)
    if not replicas:
        print(f"{connection.address}: no address to check", file=sys.stderr)
        return 1
    serving = True
    for replica in replicas:  # every replica behind the address; one line each when several
        prefix = f"{replica.target}: " if len(replicas) > 1 else ""
        with connection.channel(replica) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
            except grpc.RpcError as exc:
                print(f"{replica.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                serving = False
                continue
        print(prefix + health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        serving = serving and reply.status == health_pb2.HealthCheckResponse.SERVING
    return 0 if serving else 1


def _print_reply(args: argparse.Namespace, ask: str) -> int:
    """Print what ``clip.<ask>()`` answers, as JSON; one line on stderr if it fails."""
    from google.protobuf.json_format import MessageToDict

    from . import CLIP, ClipServeError

    with CLIP(args.address, timeout=args.timeout, model=getattr(args, "model", ""), **_security(args)) as clip:
        try:
            reply = getattr(clip, ask)()
        except ClipServeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(MessageToDict(reply.proto, always_print_fields_with_no_presence=True), indent=2))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    return _print_reply(args, "model_info")


def _cmd_models(args: argparse.Namespace) -> int:
    return _print_reply(args, "list_models")


def _cannot_plot(args: argparse.Namespace) -> bool:
    """--plot without matplotlib: said at once (exit status 2), not after an hour's run."""
    from .files.plot import missing

    problem = missing() if args.plot else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
    return problem is not None


@contextlib.contextmanager
def _engine(args: argparse.Namespace, job, **client):
    """(what scores, the job) for a file tool: the SDK's client, or with --engine ray a Ray Data
    job per chunk, the job's URIs staged locally (clipserve.ray.files)."""
    from . import CLIP

    args.chunk_size = args.chunk_size or ray_files.CHUNK_ROWS[args.engine]
    if args.engine == "ray":
        with ray_files.ray_engine(args, job, timeout=args.timeout, **_security(args), **client) as engine_and_job:
            yield engine_and_job
        return
    with CLIP(args.address, timeout=args.timeout, model=args.model, **_security(args), **client) as clip:
        yield clip, job


def _run_file_tool(
    args: argparse.Namespace, job: Any, run: Callable[[Any, Any], Any], **client: Any
) -> tuple[Any, Any] | None:
    """``run(clip, job)`` on the engine --engine names, its summary printed: (the summary, the
    job as run, whose files --engine ray may have staged), or None when the run itself failed
    (said why on stderr)."""
    from . import ClipServeError
    from .files.rows import RunFailed

    try:
        with _engine(args, job, **client) as (clip, job):
            summary = run(clip, job)
    except (RunFailed, ClipServeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    for line in summary.lines():
        print(line, file=sys.stderr)
    return summary, job


def _cmd_embed_file(args: argparse.Namespace) -> int:
    from .files.embedfile import EmbedFileJob, embed_file

    if _cannot_plot(args):
        return 2
    job = EmbedFileJob(
        input=Path(args.input),
        output=Path(args.output),
        column=args.text_column or args.image_column,
        images=args.image_column is not None,
        id_column=args.id_column,
        raw=args.raw,
    )
    ran = _run_file_tool(
        args,
        job,
        lambda clip, job: embed_file(
            clip, job, resume=args.resume, chunk_size=args.chunk_size, progress=not args.no_progress
        ),
    )
    if ran is None:
        return 1
    _, job = ran

    def draw() -> None:
        from .files.plot import plot_embed_file

        plot_embed_file(Path(args.plot), job)

    return _plot_after(args.plot, draw)


def _cmd_score_file(args: argparse.Namespace) -> int:
    from .files.scorefile import FileJob, job_settings_from_config, retry_failed, score_file

    if _cannot_plot(args):
        return 2
    settings = job_settings_from_config(args.config) if args.config else {}
    for field in (
        "qrels",
        "images",
        "output",
        "column_query",
        "column_image_id",
        "image_url_column",
        "image_base_url",
        "col_name",
        "error_column",
    ):
        if getattr(args, field) is not None:
            settings[field] = getattr(args, field)
    qrels = Path(settings.pop("qrels")) if "qrels" in settings else None
    if qrels is None and not (args.retry_failed and "output" in settings):
        print("error: give the qrels file (argument, or qrels_jsonl in --config)", file=sys.stderr)
        return 2
    # --retry-failed re-scores the output: with -o (or qrels_with_score_jsonl), no qrels file is read.
    default_output = qrels.with_name(qrels.stem + "_with_score" + qrels.suffix) if qrels is not None else None
    output = settings.pop("output", None) or default_output
    assert output is not None  # checked above: without a qrels file, --retry-failed names the output
    images = settings.pop("images", None)
    job = FileJob(qrels=qrels, output=Path(output), images=Path(images) if images else None, **settings)

    def run(clip: Any, job: Any) -> Any:
        if args.retry_failed:
            return retry_failed(clip, job, chunk_size=args.chunk_size, progress=not args.no_progress)
        return score_file(clip, job, resume=args.resume, chunk_size=args.chunk_size, progress=not args.no_progress)

    ran = _run_file_tool(args, job, run, config=args.config)
    if ran is None:
        return 1
    summary, job = ran

    def draw() -> None:
        from .files.plot import plot_score_file

        plot_score_file(Path(args.plot), job, summary.tally.codes)

    status = _plot_after(args.plot, draw)
    return max(status, report_command.after_score_file(args.report, args.config, job)) if args.report else status


def _plot_after(path: str | None, draw: Callable[[], None]) -> int:
    """Draw the chart once the run's output and summary are out: a chart that cannot be drawn
    or written (a full disk, a bad path) loses nothing of an hour's run, and says why."""
    if not path:
        return 0
    try:
        draw()
    except (OSError, ValueError) as exc:
        print(f"error: the chart {path} could not be drawn: {exc}", file=sys.stderr)
        return 1
    print(f"chart: {path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipserve", description="CLIP text-image scoring over gRPC")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `serve` parses its own flags (server package); listed here for --help.
    sub.add_parser(
        "serve", help="run the server (needs the [server] extra); see `clipserve serve --help`", add_help=False
    )

    score = sub.add_parser("score", help="score one (query, image) pair and print the score")
    score.add_argument("query")
    score.add_argument("image", help="http(s) URL, local path or file:// URL")
    _add_address(score)
    _add_model(score)
    score.set_defaults(func=_cmd_score)

    health = sub.add_parser("health", help="print the server's health (exit 0 when SERVING)")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    _add_address(health)
    health.set_defaults(func=_cmd_health)

    score_file = sub.add_parser(
        "score-file",
        help="score every row of a qrels file (JSONL/CSV/Parquet) and write it with a score column",
        description="The benchmark maker's similarity step: reads its qrels file, finds each image's URL "
        "(an image URL column in the rows, else the images file, else image_base_url + '/' + image id), "
        "and writes every row unchanged plus the score column (null where a pair failed), in input order. "
        "Settings default to the benchmark maker's config.toml keys qrels_jsonl, images_jsonl, "
        "qrels_with_score_jsonl, column_query, column_image_id, image_url_temp_column, image_base_url and "
        "[similarity_config] col_name; the server address comes from --address or $CLIPSERVE_ADDRESS. "
        "Exit code 1 only when the run itself failed (server unreachable, unreadable files).",
    )
    score_file.add_argument("qrels", nargs="?", default=None, help="qrels file (.jsonl, .csv, .parquet)")
    score_file.add_argument("-o", "--output", default=None, help="output file (default: <qrels>_with_score.<ext>)")
    add_columns_and_images(score_file)
    score_file.add_argument("--col-name", default=None, help="score column to write (default: clip_score)")
    score_file.add_argument(
        "--error-column",
        default=None,
        metavar="NAME",
        help="also write each row's error (null when scored) to this column",
    )
    again = score_file.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="keep rows already in the output and score the rest")
    again.add_argument(
        "--retry-failed",
        action="store_true",
        help=(
            "re-score, in the output file, the rows whose score is null or missing; every other row stays byte for byte"
        ),
    )
    score_file.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="rows scored and written at a time (default: 1024; 65536 with --engine ray, a Ray Data job each)",
    )
    score_file.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="also chart the output: scores overall and per query, failures by code (needs clipserve[plot])",
    )
    score_file.add_argument(
        "--report", default=None, metavar="HTML", help="also write the output as a report page (see `clipserve report`)"
    )
    score_file.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_address(score_file)
    _add_model(score_file)
    ray_files.add_arguments(score_file)
    score_file.set_defaults(func=_cmd_score_file, timeout=None)

    embed_file = sub.add_parser(
        "embed-file",
        help="embed one column (texts or images) of every row of a file; write Parquet or .npy",
        description="Reads rows (.jsonl, .csv, .parquet) and writes each row's embedding, in input order: "
        "a .parquet output has the input columns (or --id-column alone) plus `embedding` (fixed-size list "
        "of float32, null where the row failed) and `error`; a .npy output is the matrix (a NaN row where a "
        "row failed) with <output>.ids.jsonl beside it. Chunks are saved as they arrive: --resume carries on "
        "after an interruption.",
    )
    embed_file.add_argument("input", help="rows to embed (.jsonl, .csv, .parquet)")
    embed_file.add_argument("-o", "--output", required=True, help="where to write the embeddings (.parquet or .npy)")
    column = embed_file.add_mutually_exclusive_group(required=True)
    column.add_argument("--text-column", default=None, help="the column of texts to embed")
    column.add_argument(
        "--image-column", default=None, help="the column of image URLs, local paths or file:// URLs to embed"
    )
    embed_file.add_argument(
        "--id-column",
        default=None,
        help="the column that names each row in the output (default: every input column; row numbers for .npy)",
    )
    embed_file.add_argument("--raw", action="store_true", help="the model's own features instead of unit vectors")
    embed_file.add_argument(
        "--resume", action="store_true", help="keep the chunks an interrupted run saved and embed the rest"
    )
    embed_file.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="rows embedded and saved at a time (default: 1024; 65536 with --engine ray, a Ray Data job each)",
    )
    embed_file.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help=(
            "also chart the output: how alike the vectors are, their lengths, failures by code "
            "(needs clipserve[plot])"
        ),
    )
    embed_file.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_address(embed_file)
    _add_model(embed_file)
    ray_files.add_arguments(embed_file)
    embed_file.set_defaults(func=_cmd_embed_file, timeout=None)

    info = sub.add_parser("info", help="print a model's info, batching and cache statistics as JSON")
    _add_address(info)
    _add_model(info)
    info.set_defaults(func=_cmd_info)

    models = sub.add_parser("models", help="list the server's models as JSON")
    _add_address(models)
    models.set_defaults(func=_cmd_models)

    report_command.add_parser(sub)
    return parser


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "serve":
        return _cmd_serve(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return quiet_on_closed_pipe(lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
