"""Starting the multi-process tests' launchers (torchrun, accelerate launch) so that a hang fails fast and clean.

gloo picks the network interface of the machine's hostname; on a machine whose hostname resolves to an address
the processes cannot reach each other on, the ranks wait on each other forever. Pinning gloo to the loopback
interface keeps both ranks on 127.0.0.1. On a timeout the whole process group (launcher and ranks) is killed, so no
orphaned rank keeps a core busy for the rest of the suite, and the ranks' output so far is shown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

LOOPBACK = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
LAUNCH_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "MASTER_ADDR": "127.0.0.1",
    **({"GLOO_SOCKET_IFNAME": LOOPBACK} if LOOPBACK else {}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    command: Callable[[], list[str]],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict | None = None,
    attempts: int = 2,
) -> subprocess.CompletedProcess:
    """Run ``command()`` (built anew per attempt, so each gets a fresh port) in its own session.

    A launch that hangs is killed with its ranks and started once more with a warning; a second hang fails with
    what it printed. A launch that finishes is never retried, whatever its result.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _launch_once(command(), timeout=timeout, cwd=cwd, env=env)
        except TimeoutError as error:
            if attempt == attempts:
                raise AssertionError(str(error)) from None
            warnings.warn(f"retrying a hung launch: {error}", stacklevel=2)
    raise AssertionError("attempts must be >= 1")


def _launch_once(command: list[str], *, timeout: float, cwd: Path | None, env: dict | None):
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env={**LAUNCH_ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise TimeoutError(
            f"{' '.join(command[:4])} ... did not finish in {timeout:.0f} s; its output so far:\n"
            f"{stdout[-2000:]}\n{stderr[-4000:]}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
