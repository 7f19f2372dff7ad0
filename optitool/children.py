"""Child processes that stop with their parent.

optitool starts children for torchrun ranks, search trials and memory measurements. `subprocess.run`
answers an interruption by SIGKILL to the direct child only: torchrun then cannot stop its ranks, which
went on training and wrote a finished report after the user was told the run had stopped. Here a child
runs in a process group of its own (so a terminal's Ctrl-C does not reach it twice), and when this process
is interrupted (Ctrl-C, or SIGTERM raised as `Terminated`) the whole group gets the same signal, a grace
period to leave its files consistent, then SIGKILL; every descendant seen is waited for before the
interruption goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

GRACE_SECONDS = 20.0


def run_child(command: Sequence[str], *, grace: float = GRACE_SECONDS, timeout: float | None = None,
              quiet_when_stopped: bool = False, **popen: Any) -> int:
    """Run `command` to its end and return its exit code. If this process is interrupted, or `timeout` passes
    (then `subprocess.TimeoutExpired` is raised), the child's whole process group is stopped first.

    `quiet_when_stopped`: the child's standard error is relayed to this process's until the stop begins, and
    dropped after (torchrun answers a SIGTERM with its own traceback, which is not news to a user who asked
    for the stop; optitool has already said "terminated")."""
    import sys
    import threading

    stopping = threading.Event()
    if quiet_when_stopped:
        popen["stderr"] = subprocess.PIPE
    proc = subprocess.Popen(list(command), start_new_session=True, preexec_fn=_die_with_parent, **popen)
    relay = None
    if quiet_when_stopped:
        def copy() -> None:
            for line in iter(proc.stderr.readline, b""):
                if not stopping.is_set():
                    sys.stderr.buffer.write(line) if hasattr(sys.stderr, "buffer") else sys.stderr.write(
                        line.decode(errors="replace"))
                    sys.stderr.flush()

        relay = threading.Thread(target=copy, daemon=True)
        relay.start()
    try:
        code = proc.wait(timeout=timeout)
    except BaseException as exc:
        stopping.set()
        signum = getattr(exc, "signum", signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM)
        stop_group(proc, signum, grace)
        raise
    if relay is not None:
        relay.join(timeout=5)
    return code


def _die_with_parent() -> None:
    """In the child, before it runs: SIGTERM when the parent dies, however it dies (Linux; SIGKILL included,
    e.g. a Ray worker killed under a search trial). Elsewhere a no-op."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def stop_group(proc: subprocess.Popen[Any], signum: int, grace: float) -> None:
    """`signum` to the process group `proc` leads and to every descendant of it, SIGKILL to whatever is still
    alive after `grace` seconds; returns when all of them are gone."""
    import threading

    if threading.current_thread() is threading.main_thread():  # a second Ctrl-C must not cut the clean-up short
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            _stop(proc, signum, grace)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    else:
        _stop(proc, signum, grace)


def _stop(proc: subprocess.Popen[Any], signum: int, grace: float) -> None:
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    _signal_all(proc.pid, family, signum)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()
        alive = [p for p in family if _alive(p)]
        if not alive:
            break
        time.sleep(0.05)
    else:
        _signal_all(proc.pid, [p for p in family if _alive(p)], signal.SIGKILL)
        psutil.wait_procs([p for p in family if p.pid != proc.pid], timeout=5)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        pass


def _signal_all(group: int, family: list[Any], signum: int) -> None:
    import psutil

    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass
    for member in family:  # descendants that left the group (a new session of their own) too
        try:
            member.send_signal(signum)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _alive(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
