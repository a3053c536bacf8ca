"""The bounded per-client view of one listener (SPEC section 12, `GET /clients`).

A heavy-hitters summary in the manner of space-saving (Metwally et al.): at most `capacity` client
keys per listener, whatever the number of distinct clients. A key not held is inserted with
`error` = the largest count evicted so far (an upper bound on the connections it may have made
while it was not held); when the table is full, the eighth with the lowest estimated count
(`accepted + error`) and no open connection is evicted in one batch, so the cost is amortised
O(log capacity) per new key and nothing is done per byte. Counts are exact from the moment a key
is held: a key whose `error` is 0 has exact `accepted`, and any key that made more than
(total connections / capacity) connections is held. See docs/clients.md.

Fed by the tracker once per connection (`seen` when its client key is known, `closed` when it
ends); read at request time (`records`) and scrape time (`tracked`, `rejections`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from connwatch._types import rfc3339

CAPACITY = 2048  # client keys held per listener (and per worker process)
LIMITS = ("max_connections", "connection_rate")  # the `limit` values (proxy.client_limits)
SORTS = ("active", "accepted", "bytes", "rejected")  # `?sort=` of /clients
DEFAULT_LIMIT = 100  # `?limit=` of /clients


class ClientEntry:
    """Counts of one held client key, as plain ints."""

    __slots__ = (
        "accepted",
        "active",
        "bytes_c2u",
        "bytes_u2c",
        "error",
        "last_seen",
        "rejected_connections",
        "rejected_rate",
    )

    def __init__(self, error: int, now: float) -> None:
        self.accepted = 0
        self.active = 0
        self.error = error
        self.bytes_c2u = 0
        self.bytes_u2c = 0
        self.rejected_connections = 0
        self.rejected_rate = 0
        self.last_seen = now


class ClientSummary:
    """The held client keys of one listener and its client-limit rejections (exact totals)."""

    __slots__ = ("_entries", "_floor", "capacity", "rejections")

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._entries: dict[str, ClientEntry] = {}
        self._floor = 0  # the largest estimate evicted so far
        self.rejections: Counter[str] = Counter()  # limit -> connections closed for it

    def __len__(self) -> int:
        return len(self._entries)

    def seen(self, key: str, rejected: str | None, now: float) -> None:
        """A new connection of `key` at wall-clock `now`; `rejected` names the limit it is over."""
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.capacity:
                self._evict()
            entry = self._entries[key] = ClientEntry(self._floor, now)
        entry.accepted += 1
        entry.last_seen = now
        if rejected is None:
            entry.active += 1
        else:
            self.rejections[rejected] += 1
            if rejected == "max_connections":
                entry.rejected_connections += 1
            else:
                entry.rejected_rate += 1

    def closed(self, key: str, c2u: int, u2c: int, now: float) -> None:
        """An admitted connection of `key` ended, having moved these bytes."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.active -= 1
            entry.bytes_c2u += c2u
            entry.bytes_u2c += u2c
            entry.last_seen = now

    def _evict(self) -> None:
        """Drop the lowest eighth by estimate, idle keys first (they cost nothing to forget)."""
        entries = self._entries
        batch = max(1, self.capacity // 8)
        ranked = sorted(
            entries.items(),
            key=lambda item: (
                item[1].active > 0,
                item[1].accepted + item[1].error,
                item[1].last_seen,
            ),
        )
        for key, entry in ranked[:batch]:
            self._floor = max(self._floor, entry.accepted + entry.error)
            del entries[key]

    def records(
        self, listener: str, live: dict[str, list[int]] | None = None
    ) -> Iterator[dict[str, Any]]:
        """One raw record per held key (numbers, `last_seen` as wall-clock seconds); `live` adds
        the bytes open connections have moved so far, by key."""
        for key, e in self._entries.items():
            c2u, u2c = live.get(key, (0, 0)) if live else (0, 0)
            yield {
                "client": key,
                "listener": listener,
                "active": max(e.active, 0),
                "accepted": e.accepted,
                "accepted_error": e.error,
                "bytes_client_to_upstream": e.bytes_c2u + c2u,
                "bytes_upstream_to_client": e.bytes_u2c + u2c,
                "rejected": {
                    "max_connections": e.rejected_connections,
                    "connection_rate": e.rejected_rate,
                },
                "last_seen": e.last_seen,
            }


# -- answering /clients (one process, or merged over workers) --------------------------------------
def merge_records(parts: Iterable[Iterable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Sum the raw records of several processes by (listener, client)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for part in parts:
        for rec in part:
            key = (rec["listener"], rec["client"])
            have = out.get(key)
            if have is None:
                out[key] = {**rec, "rejected": dict(rec["rejected"])}
                continue
            for field in (
                "active",
                "accepted",
                "accepted_error",
                "bytes_client_to_upstream",
                "bytes_upstream_to_client",
            ):
                have[field] += rec[field]
            for limit in LIMITS:
                have["rejected"][limit] += rec["rejected"][limit]
            have["last_seen"] = max(have["last_seen"], rec["last_seen"])
    return list(out.values())


def _sort_key(sort: str) -> Any:
    if sort == "active":
        return lambda r: (r["active"], r["accepted"])
    if sort == "bytes":
        return lambda r: (
            r["bytes_client_to_upstream"] + r["bytes_upstream_to_client"],
            r["accepted"],
        )
    if sort == "rejected":
        return lambda r: (sum(r["rejected"].values()), r["accepted"])
    return lambda r: (r["accepted"], r["active"])


def top_records(records: list[dict[str, Any]], sort: str, limit: int) -> list[dict[str, Any]]:
    """The `limit` busiest by `sort`, as `/clients` shows them (`last_seen` in RFC 3339)."""
    records.sort(key=lambda r: (r["listener"], r["client"]))  # ties in a stable order
    records.sort(key=_sort_key(sort), reverse=True)
    out = records[:limit]
    for rec in out:
        rec["last_seen"] = rfc3339(rec["last_seen"])
    return out
