"""What the machine is, and how busy other processes kept it while we measured.

The benchmark runs on shared 2-core machines where other jobs (test suites, builds)
come and go; a figure taken while another process held a core is not comparable.
`CpuMeter` reports how many cores processes other than ours kept busy during a run,
and the hypervisor's steal, so such runs can be recognised.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


def describe() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((l.split(":", 1)[1].strip() for l in handle if l.startswith("model name")), model)
    except OSError:
        pass
    wrk = None
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10, check=False)
        wrk = (out.stdout or out.stderr).splitlines()[0].split(" [")[0] if (out.stdout or out.stderr) else "wrk"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "kernel": platform.release(),
        "wrk": wrk,
        "loadavg": loadavg(),
    }


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "?"


def _system() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies over all CPUs."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


def process_jiffies(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            after_name = handle.read().rsplit(")", 1)[1].split()
        return int(after_name[11]) + int(after_name[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class Usage:
    seconds: float
    others_cores: float  # cores kept busy by processes that are not ours
    ours_cores: float
    steal_pct: float
    pids_cpu_seconds: float = 0.0  # CPU used by the processes passed to CpuMeter (the server)

    def note(self) -> str:
        return f"others {self.others_cores:.2f} cores, steal {self.steal_pct:.0f}%"


class CpuMeter:
    """Measure CPU used by everything except this process, its reaped children and `pids`."""

    def __init__(self, pids: list[int] | None = None) -> None:
        self.pids = list(pids or [])

    def __enter__(self) -> "CpuMeter":
        self._wall = time.monotonic()
        self._sys = _system()
        self._own = self._own_jiffies()
        self._pids = sum(process_jiffies(p) for p in self.pids)
        return self

    def _own_jiffies(self) -> int:
        t = os.times()
        own = (t.user + t.system + t.children_user + t.children_system) * TICK
        return int(own) + sum(process_jiffies(p) for p in self.pids)

    def __exit__(self, *exc) -> None:
        wall = max(time.monotonic() - self._wall, 1e-6)
        busy0, steal0, total0 = self._sys
        busy1, steal1, total1 = _system()
        own = self._own_jiffies() - self._own
        pids = sum(process_jiffies(p) for p in self.pids) - self._pids
        busy = busy1 - busy0
        self.usage = Usage(
            round(wall, 2),
            round(max(busy - own, 0) / TICK / wall, 2),
            round(own / TICK / wall, 2),
            round(100 * (steal1 - steal0) / max(total1 - total0, 1), 1),
            round(pids / TICK, 2),
        )


def busy_cores(window: float = 2.0) -> float:
    """Cores kept busy by all processes over `window` seconds."""
    busy0, _, total0 = _system()
    time.sleep(window)
    busy1, _, total1 = _system()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1)


def wait_quiet(max_wait: float, threshold: float = 0.3, log=None) -> float:
    """Wait (at most `max_wait` s) until the machine is nearly idle; return the last busy figure.

    Call it when our own servers are idle: everything it sees is someone else's work.
    """
    if max_wait <= 0:
        return -1.0
    deadline = time.monotonic() + max_wait
    busy = busy_cores()
    waited = False
    while busy > threshold and time.monotonic() < deadline:
        if log and not waited:
            log(f"  waiting up to {max_wait:.0f} s for other processes to go quiet ({busy:.2f} cores busy)")
        waited = True
        busy = busy_cores()
    if log and waited:
        log(f"  {'quiet' if busy <= threshold else 'still busy'}: {busy:.2f} cores busy")
    return busy
