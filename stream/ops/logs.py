"""Log output: text or JSON lines; one-shot commands log only warnings."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import msgspec

from stream.config import Config


class JsonLines(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record."""
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,  # which worker, under `run --workers N`
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def setup_logging(config: Config, *, quiet: bool) -> None:
    """The processor logs at the configured level; one-shot commands only warnings."""
    level = logging.getLevelName(config.runtime.log_level)
    handler = logging.StreamHandler(sys.stderr)
    if config.runtime.log_format == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
        )
    logging.basicConfig(level=max(level, logging.WARNING) if quiet else level, handlers=[handler])
    # aiokafka logs transient errors it retries itself; a one-shot command reports real
    # failures as one line from the exception instead.
    client_level = logging.CRITICAL if quiet else max(logging.WARNING, logging.root.level)
    logging.getLogger("aiokafka").setLevel(client_level)
