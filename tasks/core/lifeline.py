"""Child processes that die with the process that started them, even when it is SIGKILLed or OOM-killed.

On Linux the kernel sends the child SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), so no temporary server
or training process is left running after a killed run. Elsewhere nothing is set and children end with their pipes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen that ties the child's life to this process (None off Linux).
    The tie is to the thread that starts the child, so start long-lived children from a thread that outlives them."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def tie() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the tie was made
            os._exit(1)

    return tie
