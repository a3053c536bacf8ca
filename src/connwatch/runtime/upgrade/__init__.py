"""Seamless upgrade (SPEC section 11): a new connwatch process takes the listening sockets over
from a running one through `upgrade_socket`.

- `messages.py`: the conversation's framing (length-prefixed JSON, file descriptors attached
  with SCM_RIGHTS) on a non-blocking Unix socket.
- `handover.py`: the old process's side: it serves `upgrade_socket`, hands its listening sockets
  over, stops accepting when told, drains as on SIGTERM and reports its counters until it exits.
- `takeover.py`: the new process's side: `connwatch run --takeover` receives the sockets, starts on
  them, tells the old one to stop accepting, and folds the old one's counters into its own.
"""
