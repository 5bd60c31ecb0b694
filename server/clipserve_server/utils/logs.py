"""Logging set-up: human-readable text, or one JSON object per line for log pipelines."""

from __future__ import annotations

import json
import logging
import time

# Attributes every LogRecord has; anything else was passed through `extra=` and is context,
# but for private ones that a library's record factory adds to every record (Ray, imported in
# the same process, stamps each with _ray_timestamp_ns).
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def escape(text: str) -> str:
    """``text`` with its control characters (newlines, tabs, escapes, C1, line and paragraph
    separators) written as escapes: a value from a caller (a request id, a URL, an error
    message) can never start a line of its own, so it cannot forge a record."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _value(value: object) -> str:
    if isinstance(value, str) and (" " in value or not value.isprintable()):
        return repr(value)  # quoted, and repr escapes what is not printable
    return escape(str(value))


class TextFormatter(logging.Formatter):
    """The usual one-line format, followed by the record's context as key=value pairs. Every
    value and the message are escaped; a traceback's lines are indented, so that any line that
    starts at the margin starts a record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's naming)
        return super().formatMessage(logging.makeLogRecord({**vars(record), "message": escape(record.message)}))

    def formatException(self, ei) -> str:  # noqa: N802, ANN001 (logging's naming and signature)
        return "\n".join("    " + line for line in super().formatException(ei).splitlines())

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={_value(v)}" for k, v in _context(record).items())
        if not context:
            return line
        first, newline, rest = line.partition("\n")  # the context goes on the record's own line
        return f"{first} {context}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _FirstOnly(logging.Filter):
    """Passes the first record of one logger and drops the ones after it."""

    def __init__(self, logger: str) -> None:
        super().__init__()
        self._logger = logger
        self._seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != self._logger:
            return True
        seen, self._seen = self._seen, True
        return not seen


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # huggingface_hub gives its logger a handler of its own when imported, and still lets its
    # records propagate to ours: each of its lines came out twice, once bare. Drop its
    # handler (importing it first, so that it is there to drop): ours prints them, once.
    import huggingface_hub.utils.logging  # noqa: F401

    logging.getLogger("huggingface_hub").handlers.clear()
    if root.level > logging.DEBUG:
        # Its HTTP layer warns on every retry of every file (ten lines for a hub that cannot
        # be reached); the first says why loading is slow, and the load failure says the rest.
        handler.addFilter(_FirstOnly("huggingface_hub.utils._http"))
