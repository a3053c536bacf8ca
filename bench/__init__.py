"""Side-by-side benchmark harness: connwatch against HAProxy, nginx, Envoy, socat and pproxy."""
