"""The bookkeeping every ``patch_X`` / ``unpatch_X`` / ``patched_X`` trio shares (TRL, verl).

A manual patch (``patch()``) stays until ``unpatch()``; scoped ones (``scoped()``) are counted,
and the originals come back when the last scope exits, unless a manual patch is on. The
integration supplies what installing and uninstalling mean; both run under one re-entrant lock.
"""

import contextlib
import threading
from typing import Callable


class PatchState:
    def __init__(self, install: Callable[[], None], uninstall: Callable[[], None]):
        self._install, self._uninstall = install, uninstall
        self.lock = threading.RLock()
        self.manual = False
        self.depth = 0

    def patch(self) -> None:
        with self.lock:
            self.manual = True
            self._install()

    def unpatch(self) -> None:
        with self.lock:
            self.manual = False
            if self.depth == 0:
                self._uninstall()

    @contextlib.contextmanager
    def scoped(self):
        with self.lock:
            self.depth += 1
            self._install()
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                if self.depth == 0 and not self.manual:
                    self._uninstall()
