"""The gateway process as the bench sees it: CPU, memory, its children, a profiler."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def process_tree(pid: int) -> list[int]:
    """Return ``pid`` and its descendants (the gateway's workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [pid], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def proc_stats(pid: int) -> dict[str, float]:
    """Peak RSS (MiB, each process's peak, summed) and CPU seconds of a process tree."""
    ticks = os.sysconf("SC_CLK_TCK")
    hwm_kib = cpu_ticks = processes = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        hwm_kib += next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0
        )
        cpu_ticks += int(fields[11]) + int(fields[12])
        processes += 1
    return {"peak_rss_mib": hwm_kib / 1024, "cpu_s": cpu_ticks / ticks, "processes": processes}


def start_profiler(pid: int, output: str, subprocesses: bool) -> subprocess.Popen[bytes]:
    """Sample the gateway with py-spy into ``output`` (collapsed stacks) while it runs."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
    command = [py_spy, "record", "--gil", "--pid", str(pid), "--format", "raw", "--rate", "250"]
    command += ["-o", output] + (["--subprocesses"] if subprocesses else [])
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
