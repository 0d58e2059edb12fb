"""The ranks of a server that ``mlx.launch`` started on this machine: the command, their process ids, a clean stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["launch_command", "lower_the_relay", "rank_pids", "start_ranks_directly", "stop_ranks"]

LAUNCH = Path(sys.executable).parent / "mlx.launch"


def launch_command(*arguments: str, ranks: int = 2) -> list[str]:
    """``mlx.launch`` over the ring on 127.0.0.1; it execs its first argument, so the interpreter comes first."""
    return [str(LAUNCH), "--hosts", "127.0.0.1", "-n", str(ranks), "--backend", "ring", "--", sys.executable,
            *arguments]  # fmt: skip


def rank_pids(port: int) -> dict[int, int]:
    """The process id of each rank serving ``--port port`` (read from the MLX_RANK the launcher gives it)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"mlx-server.py" in command and f"--port\0{port}\0".encode() in command + b"\0":
            for variable in environment:
                if variable.startswith(b"MLX_RANK="):
                    found[int(variable.split(b"=")[1])] = int(entry.name)
    return found


def lower_the_relay(launcher: subprocess.Popen[bytes], port: int, ranks: int = 2, seconds: float = 60) -> None:
    """Once every rank has started, give ``mlx.launch``'s own threads the lowest priority (the ranks keep theirs).

    Its relay loop spins (see ``start_ranks_directly``), and on its own stdin
    too when that is at its end (/dev/null, as under pytest-xdist): a core's
    worth of work for nothing, taken from the ranks and from the tests beside
    them.  At the lowest priority it takes only what nothing else wants.  (On
    Linux: a thread's priority is its own there.)
    """
    tasks = Path(f"/proc/{launcher.pid}/task")
    deadline = time.monotonic() + seconds
    while len(rank_pids(port)) < ranks and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(task.name), 19)


def stop_ranks(launcher: subprocess.Popen[bytes], port: int, seconds: float = 60) -> None:
    """Stop rank 0 as Ctrl-C would (it tells the other ranks), then wait for the launcher; kill what is left."""
    ranks = rank_pids(port)
    if 0 in ranks:
        os.kill(ranks[0], signal.SIGINT)
    try:
        launcher.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        for pid in rank_pids(port).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()


def start_ranks_directly(
    arguments: list[str], ring_ports: list[int], environment: dict[str, str]
) -> list[subprocess.Popen[bytes]]:
    """The ranks as ``mlx.launch`` starts them on 127.0.0.1 (a ring hostfile, MLX_RANK), without its relay.

    ``mlx.launch`` relays each rank's output through a loop that selects on the
    rank's stdin, which is always writable: it keeps a core busy, which on a
    2-core machine is half of what the ranks could use.
    """
    hostfile = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlx-ring-{os.getpid()}-{ring_ports[0]}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in ring_ports]))
    return [
        subprocess.Popen(
            [sys.executable, *arguments],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**environment, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)},
        )
        for rank in range(len(ring_ports))
    ]
