"""Pure codecs, no I/O: the heartbeat frame (SPEC section 7) and the PROXY protocol v1/v2 header."""
