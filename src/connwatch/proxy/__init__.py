"""The data plane: accept, PROXY header, connect upstream, forward bytes both ways with flow control."""
