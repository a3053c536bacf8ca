"""`connwatch top`: a live terminal table of a daemon's connections, read over its admin API."""
