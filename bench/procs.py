"""Timing whole processes: wall time and peak RSS of each run, taken from the kernel's rusage."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field


@dataclass
class Runs:
    wall: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        def s(xs):
            return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None

        return {"wall_s": s(self.wall), "peak_rss_mb": s(self.rss_mb), "runs": len(self.wall),
                "exit_codes": sorted(set(self.codes))}


def run_once(cmd: list[str], env: dict | None = None) -> tuple[float, float, int]:
    """``(wall seconds, peak RSS MiB, exit code)`` of one process.

    The page cache's dirty pages are flushed first (not timed): every run starts from the same
    state, instead of paying for the writeback of the previous run's output."""
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.stderr:
        p.stderr.read()
        p.stderr.close()
    return wall, usage.ru_maxrss / 1024.0, p.returncode


def paired(cmd_a: list[str], cmd_b: list[str], n: int, env: dict | None = None, warmup: int = 1) -> dict:
    """Run A and B alternately (A B A B ...) after a warm-up; ratios are taken pair by pair so
    that drift in the machine's speed cancels."""
    for _ in range(warmup):
        run_once(cmd_a, env)
        run_once(cmd_b, env)
    a, b = Runs(), Runs()
    ratios_wall, ratios_rss = [], []
    for _ in range(n):
        for runs, cmd in ((a, cmd_a), (b, cmd_b)):
            w, r, c = run_once(cmd, env)
            runs.wall.append(w)
            runs.rss_mb.append(r)
            runs.codes.append(c)
        ratios_wall.append(a.wall[-1] / b.wall[-1])
        ratios_rss.append(a.rss_mb[-1] / b.rss_mb[-1])
    return {
        "a": a.summary(), "b": b.summary(),
        "ratio_wall": {"median": statistics.median(ratios_wall), "min": min(ratios_wall), "max": max(ratios_wall)},
        "ratio_rss": {"median": statistics.median(ratios_rss), "min": min(ratios_rss), "max": max(ratios_rss)},
    }


def repeat(cmd: list[str], n: int, env: dict | None = None, warmup: int = 1) -> dict:
    for _ in range(warmup):
        run_once(cmd, env)
    r = Runs()
    for _ in range(n):
        w, m, c = run_once(cmd, env)
        r.wall.append(w)
        r.rss_mb.append(m)
        r.codes.append(c)
    return r.summary()
