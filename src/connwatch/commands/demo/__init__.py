"""`connwatch demo`: a built-in upstream, traffic and connwatch in front, shown live.

upstream (the built-in server), traffic (the clients), embedded_daemon (the real Daemon in this
process), display (top's view of it), command (add_demo_parser, cmd_demo).
"""
