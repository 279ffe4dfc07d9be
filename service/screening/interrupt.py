"""Ctrl-C during `screen --engine processes`: the `screen` process handles it; its pool workers never see it."""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def ctrl_c_held():
    """Hold Ctrl-C back while worker processes are started, and raise it once they are.

    SIGINT is blocked in this thread, and a process (or thread) started meanwhile inherits that
    mask, so a worker never takes Ctrl-C itself: from a terminal Ctrl-C reaches the whole process
    group, and a worker that took it would print its own traceback, even while still starting.
    Meanwhile a Ctrl-C that reaches another thread of this process is only noted, so that no
    KeyboardInterrupt cuts a worker's start in half; it is raised when the workers are up.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: pressed.append(number))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one pending here is noted now
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt
