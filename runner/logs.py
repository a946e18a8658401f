"""Log output for people (plain lines) or for log shippers (one JSON object per
line), on the `runner` logger.

A record may carry structured fields in `extra`: `event` (what happened:
`progress`, `budget_alert`, `stopping`, ...), `run_id`, `tenant` and `counts`;
the JSON form puts them at the top level. Keys never reach a log: messages name
the variable that holds a key, never the key.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]
FIELDS = ("event", "run_id", "tenant", "counts")
log = logging.getLogger("runner")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": "log",
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if hasattr(record, name):
                payload[name] = getattr(record, name)
        return json.dumps(payload, ensure_ascii=False, default=str)


def current_format() -> LogFormat:
    """The format `configure` last set: "text" unless it was "json"."""
    json_handlers = (h for h in log.handlers if isinstance(h.formatter, JsonFormatter))
    return "json" if any(json_handlers) else "text"


def configure(fmt: LogFormat = "text") -> None:
    """Send the `runner` logger to stderr in `fmt`, replacing earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    for old in list(log.handlers):
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
