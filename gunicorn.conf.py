"""gunicorn settings shared by `make run` and the Dockerfile.

Sync workers, one per core: the work is CPU-bound JSON (../shared/MEASURED.md).
The app is preloaded in the master so a broken rule set stops start-up before any
worker forks; on SIGHUP the master re-reads rules/ (keeping the last good set if
the new one fails) before it forks fresh workers.
"""
import multiprocessing
import os
import tempfile

# Workers share Prometheus metrics through files in this folder (prometheus-client multiprocess mode).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="calcinosis-metrics-"))

bind = os.environ.get("BIND", "0.0.0.0:8080")
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count()))
worker_class = "sync"
preload_app = True
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 10
keepalive = 5
# The app writes its own JSON access line per request (CDS_ACCESS_LOG, on by default), by route
# template and never with the query string; gunicorn's own access log would print raw paths.
accesslog = None
errorlog = "-"


def pre_fork(server, worker):
    """Pick up edited rules in the master, so new workers start from the last good set."""
    app = server.app.wsgi()
    app.extensions["calcinosis"].rules.refresh()
    # Workers inherit a frozen heap: collections walk only what a request allocates.
    from service.app import freeze_long_lived_objects

    freeze_long_lived_objects()


def child_exit(server, worker):
    """Let the metrics of a dead worker stop counting as live gauges."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
