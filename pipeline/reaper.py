"""A watchdog that kills a run's engine processes if the run itself is killed.

vLLM runs its engine in child processes. ``kill -9`` of the main process gives it no chance to
stop them, and they would keep holding GPU memory, so the next run could not start. The reaper is
a separate process in its own session, connected to the main process by a pipe. It keeps a list of
the main process's descendants; when the pipe reports end-of-file (the main process is gone, however
it ended), it kills those that are still alive.

Started as ``python -m pipeline.reaper PID``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys

POLL_S = 0.5
GRACE_S = 3.0

_pipe = None


def start() -> None:
    """Start the reaper for this process (once). Its pipe closes when this process ends."""
    global _pipe
    if _pipe is not None:
        return
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        start_new_session=True,  # out of our process group: Ctrl-C and killpg spare it
    )
    _pipe = proc.stdin


def _watch(main_pid: int) -> None:
    import psutil

    me = os.getpid()
    known: dict[int, float] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # end-of-file: the main process has exited
        try:
            for child in psutil.Process(main_pid).children(recursive=True):
                if child.pid != me:
                    known[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            break
    leftovers = []
    for pid, created in known.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:  # not a recycled pid
                leftovers.append(proc)
        except psutil.NoSuchProcess:
            pass
    for proc in leftovers:
        _signal(proc, signal.SIGTERM)
    _, alive = psutil.wait_procs(leftovers, timeout=GRACE_S)
    for proc in alive:
        _signal(proc, signal.SIGKILL)


def _signal(proc, sig: int) -> None:
    with contextlib.suppress(Exception):  # already gone
        proc.send_signal(sig)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch(int(sys.argv[1]))
