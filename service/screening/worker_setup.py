"""Run by each worker process of the embedded LocalCluster as it starts (`distributed.worker.preload`)."""
from __future__ import annotations

import signal
import threading


def dask_setup(worker) -> None:
    """Leave Ctrl-C to `screen`, which cancels the run and closes the cluster.

    From a terminal, Ctrl-C reaches the whole process group: a worker that took it too would
    print its own KeyboardInterrupt traceback while `screen` shuts it down. (A worker process
    still starting, before this runs, can still take it.)
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
