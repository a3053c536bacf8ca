"""FdWatch: tells when the fd numbers a listener's connections get say descriptors run short.

Linux hands out the lowest free descriptor, so an fd numbered `n` means `n` lower ones are in
use. Upstream sockets are the listener's newest descriptors: their numbers are looked at as they
are opened (one comparison per connection), and the acceptor is told when they cross a mark.
"""

from __future__ import annotations

import resource
from collections.abc import Callable

_NEVER = 1 << 62  # a mark no fd number reaches


class FdWatch:
    """`low <= fd < high` while nothing is to be said; `moved(fd)` otherwise.

    While fds are plenty `low` is -1 and `high` a mark below the limit; once short, `high` is
    never reached and `low` is a lower mark (hysteresis: no flapping around one number).
    """

    __slots__ = ("_on_plenty", "_on_short", "high", "low", "mark_high", "mark_low", "short")

    def __init__(self, on_short: Callable[[], None], on_plenty: Callable[[], None]) -> None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = _NEVER if soft == resource.RLIM_INFINITY else soft
        margin = max(16, limit // 8)  # fds that may be taken between two looks
        self.mark_high = limit - margin
        self.mark_low = limit - 2 * margin
        self._on_short = on_short
        self._on_plenty = on_plenty
        self.short = False
        self.low, self.high = -1, self.mark_high

    def moved(self, fd: int) -> None:
        if fd >= self.high:
            self.set_short(True)
        elif fd < self.low:
            self.set_short(False)

    def set_short(self, short: bool) -> None:
        if short == self.short:
            return
        self.short = short
        if short:
            self.low, self.high = self.mark_low, _NEVER
            self._on_short()
        else:
            self.low, self.high = -1, self.mark_high
            self._on_plenty()
