"""A dependency-free text progress bar on stderr."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """``desc [#####.....] i/total  elapsed  key=value`` redrawn in place on stderr.

    Use as a context manager; ``update(n, **postfix)`` advances it. ``enabled=False`` draws nothing
    (ranks other than 0 in distributed runs).
    """

    def __init__(self, total: int, desc: str = "", width: int = 30, enabled: bool = True, stream=None):
        self.total = max(int(total), 1)
        self.desc = desc
        self.width = width
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.postfix = ""
        self.start = time.perf_counter()

    def update(self, n: int = 1, **postfix) -> None:
        self.count = min(self.count + n, self.total)
        if postfix:
            self.postfix = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in postfix.items())
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        filled = self.width * self.count // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.desc} [{bar}] {self.count}/{self.total} {elapsed:6.1f}s  {self.postfix}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        self._draw()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
