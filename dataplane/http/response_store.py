"""The Responses API's stored responses: SQLite in the run directory
(``<run_dir>/responses.sqlite3``), so that a ``previous_response_id`` chain survives a
restart of the service.

A row is one response: the response object (``GET /v1/responses/{id}``) and the
conversation it ends (its chain's items, its input items and its output items), from
which the next request of the chain continues.  The store is bounded: a row expires
``[http] responses_ttl_s`` after it was made, and past ``responses_max_bytes`` (the
rows' JSON text together) the oldest rows are evicted.  Calls are synchronous on the
gateway's loop: each is one small indexed statement on a local file.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

FILE = "responses.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    response TEXT NOT NULL,
    items TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created);
"""


class ResponseStore:
    def __init__(self, path: Path, max_bytes: int, ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def put(self, rid: str, response: dict[str, Any], items: list[dict[str, Any]]) -> bool:
        """Store a response and its conversation; False if it is larger than the store."""
        r, i = json.dumps(response, ensure_ascii=False), json.dumps(items, ensure_ascii=False)
        size = len(r) + len(i)
        if size > self.max_bytes:
            return False
        now = self.clock()
        self.db.execute("DELETE FROM responses WHERE created < ?", (now - self.ttl_s,))
        total = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM responses").fetchone()[0]
        while total + size > self.max_bytes:
            row = self.db.execute(
                "SELECT id, size FROM responses ORDER BY created LIMIT 1").fetchone()
            if row is None:
                break
            self.db.execute("DELETE FROM responses WHERE id = ?", (row[0],))
            total -= row[1]
        self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                        (rid, now, r, i, size))
        return True

    def _row(self, rid: str, column: str) -> Any:
        row = self.db.execute(f"SELECT {column} FROM responses WHERE id = ? AND created >= ?",
                              (rid, self.clock() - self.ttl_s)).fetchone()
        return None if row is None else json.loads(row[0])

    def response(self, rid: str) -> dict[str, Any] | None:
        return self._row(rid, "response")

    def items(self, rid: str) -> list[dict[str, Any]] | None:
        """The conversation a stored response ends, as input items."""
        return self._row(rid, "items")

    def delete(self, rid: str) -> bool:
        return self.db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount > 0
