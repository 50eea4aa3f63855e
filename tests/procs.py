"""Find the processes a Ray instance started, by the private temp dir on their command lines: the tests
stop or check exactly those (`ray stop` would stop every Ray process of the user on the machine)."""
from __future__ import annotations

import os


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, cmdline) of every process we can read."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


def cluster_processes(marker: str) -> dict[int, str]:
    """Processes whose command line names `marker` (our temp dir) and all their descendants."""
    table = _proc_table()
    mine = {pid for pid, (_, cmd) in table.items() if marker in cmd and pid != os.getpid()}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _) in table.items() if ppid in mine} - mine
        grew = bool(kids)
        mine |= kids
    return {pid: table[pid][1] for pid in mine}


def free_port() -> int:
    """A port of 127.0.0.1 nobody listens on (bound, then released)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
