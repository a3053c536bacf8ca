"""The process: the daemon's assembly, signals, reload and shutdown; worker processes."""
