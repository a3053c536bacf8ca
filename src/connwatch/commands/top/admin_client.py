"""The admin API client of `connwatch top`: blocking HTTP reads and the thread that polls them.

It reads the admin API once a second: `/connections` for the rows, `/metrics` for the totals in
the header, `/readyz` for the upstreams. Fetching runs in a background thread (`Poller`) so that
key presses are answered at once.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Final

from connwatch.commands.top.clients_view import FETCH_LIMIT
from connwatch.commands.top.model import Snapshot, totals_from_metrics, upstreams_from_readiness
from connwatch.commands.top.upstreams_table import target_rows
from connwatch.exceptions import AdminApiError, describe_error

__all__ = ["HTTP_TIMEOUT_S", "REFRESH_S", "AdminClient", "Poller"]

REFRESH_S: Final = 1.0
HTTP_TIMEOUT_S: Final = 3.0


class AdminClient:
    """Blocking reads of a daemon's admin API (stdlib urllib; run it off the UI thread).

    AdminApiError when the daemon cannot be reached or answers with something else than
    connwatch's admin API; TimeoutError when it is reachable but slow (worth retrying).
    """

    def __init__(
        self, base_url: str, listener: str | None = None, timeout: float = HTTP_TIMEOUT_S
    ) -> None:
        base = base_url if "://" in base_url else f"http://{base_url}"
        self.base_url = base.rstrip("/")
        self.listener = listener
        self.timeout = timeout

    def snapshot(self) -> Snapshot:
        import urllib.parse

        query = "?" + urllib.parse.urlencode({"listener": self.listener}) if self.listener else ""
        connections = self._json("/connections" + query)
        if not isinstance(connections, list):
            raise AdminApiError(f"{self.base_url}/connections did not return a list")
        totals = totals_from_metrics(self._get("/metrics").decode(), self.listener)
        readiness = self._json("/readyz", also_ok=503)
        if not isinstance(readiness, dict):
            raise AdminApiError(f"{self.base_url}/readyz did not return an object")
        ready, upstreams = upstreams_from_readiness(readiness, self.listener)
        health = self._json("/healthz")
        upgrade = health.get("upgrade") if isinstance(health, dict) else None
        clients = self._json(f"/clients?limit={FETCH_LIMIT}" + query.replace("?", "&"))
        if not isinstance(clients, list):
            raise AdminApiError(f"{self.base_url}/clients did not return a list")
        targets = target_rows(self._json("/upstreams" + query), self.listener)
        return Snapshot(
            time.monotonic(),
            connections,
            totals,
            upstreams,
            ready,
            upgrade=upgrade if isinstance(upgrade, dict) else None,
            clients=clients,
            targets=targets,
        )

    def _json(self, path: str, also_ok: int | None = None) -> Any:
        body = self._get(path, also_ok)
        try:
            return json.loads(body)
        except ValueError:
            raise AdminApiError(
                f"{self.base_url}{path} did not return JSON: is this connwatch's admin endpoint?"
            ) from None

    def _get(self, path: str, also_ok: int | None = None) -> bytes:
        import urllib.error
        import urllib.request

        url = self.base_url + path
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as err:
            if err.code == also_ok:
                return bytes(err.read())
            raise AdminApiError(f"{url} answered HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise TimeoutError(f"{url}: no answer within {self.timeout:g}s") from None
            raise AdminApiError(f"cannot reach {self.base_url}: {_reason(err.reason)}") from None
        except TimeoutError:
            raise TimeoutError(f"{url}: no answer within {self.timeout:g}s") from None
        except OSError as err:  # a reset or a broken connection in the middle of an answer
            raise AdminApiError(f"cannot read {url}: {_reason(err)}") from None


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and (reason.errno or reason.strerror):
        text = describe_error(reason)
        return text[0].lower() + text[1:]
    return str(reason)


class Poller:
    """Fetches a snapshot every `interval` in a daemon thread; the UI thread `take()`s it.

    A timeout is reported as staleness and retried; any other failure ends the polling and is
    kept in `error`.
    """

    def __init__(self, client: AdminClient, interval: float = REFRESH_S) -> None:
        self._client = client
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._latest: Snapshot | None = None
        self.stale: str | None = None
        self.error: AdminApiError | None = None
        self._thread = threading.Thread(target=self._run, name="connwatch-top-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take(self) -> Snapshot | None:
        """The snapshot fetched since the last call, if any."""
        with self._lock:
            snapshot, self._latest = self._latest, None
        return snapshot

    def close(self) -> None:
        self._stop.set()
        # Do not wait out a request in flight: the thread is a daemon thread and exits with us.
        self._thread.join(timeout=0.2)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                snapshot = self._client.snapshot()
            except TimeoutError as exc:
                self.stale = str(exc)
                continue
            except AdminApiError as exc:
                self.error = exc
                return
            with self._lock:
                self._latest = snapshot
            self.stale = None
