"""Per-connection liveness: the kernel's TCP_INFO and the heartbeat watchdog that judges it."""
