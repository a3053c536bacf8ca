"""`connwatch top`: a live terminal table of a daemon's connections, read over its admin API.

model (Snapshot, Totals, rows) <- admin_client (HTTP reads, the poller thread) and view (rich
rendering); keys (keyboard input); command (add_top_parser, cmd_top) ties them together.
"""
