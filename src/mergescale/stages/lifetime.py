"""Worker processes that die with their parent."""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent() -> None:
    """A worker whose parent is gone (killed, not interrupted) stops too, instead of working on for nobody;
    its half-written output is cleaned up by the next run."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
