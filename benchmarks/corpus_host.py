"""The benchmarks' image host: the corpus over loopback HTTP, from a process of its own.

    python benchmarks/corpus_host.py FOLDER        # prints "http://127.0.0.1:PORT", serves FOLDER's files

A real image host (a CDN, S3, nginx) costs the benchmark nothing. An HTTP server in the
benchmark's own process does: its threads share that process's GIL with the SDK, each request
waits for it several times, and on a 16-core GPU machine that host, not clipserve, set the pace
of a cold pass. So the host gets its own process and one asyncio loop (aiohttp's C parser, no
threads), with every file in memory and keep-alive connections, as an image host has.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


class CorpusHost:
    """``serve_corpus``'s handle: the base URL, and ``shutdown()`` to stop the process."""

    def __init__(self, corpus: dict[str, bytes]) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="clipserve-corpus-"))
        for name, data in corpus.items():
            (self._folder / name).write_bytes(data)
        # Its stdin is ours: when this process ends, however it ends, the host sees EOF and exits.
        self._proc = subprocess.Popen(
            [sys.executable, __file__, str(self._folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None
        self.base = self._proc.stdout.readline().strip()
        if not self.base.startswith("http://"):
            raise RuntimeError(f"the corpus host did not start (exit code {self._proc.wait()})")

    def shutdown(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=30)
        shutil.rmtree(self._folder, ignore_errors=True)


def serve_corpus(corpus: dict[str, bytes]) -> tuple[CorpusHost, str]:
    host = CorpusHost(corpus)
    return host, host.base


def main(folder: str) -> None:
    import asyncio
    import os
    import threading

    from aiohttp import web

    files = {path.name: path.read_bytes() for path in Path(folder).iterdir()}

    async def get(request: web.Request) -> web.Response:
        body = files.get(request.match_info["name"])
        return web.Response(body=body) if body is not None else web.Response(status=404)

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/{name}", get)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()  # the benchmark is gone
    asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv[1])
