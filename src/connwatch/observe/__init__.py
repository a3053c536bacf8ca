"""Observability: the tracker, connection log lines, log set-up, metrics and the admin API."""
