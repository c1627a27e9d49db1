"""bench_serve's servers: a server process on a free loopback port, its output in a log file, stopped on exit."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

from benchmarks.serve_client import httpx

# Ray's workers take ports 10002-19999 by default and everything that binds port 0 gets one from the
# kernel's ephemeral range: a port picked between the two is not taken by another process (a Ray test or a
# vLLM in the other test worker) in the seconds before the server binds it ("Address already in use").
LOWEST_PORT = 20000


def ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (what a bind to port 0 may be handed)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A loopback port that binds now, below the ephemeral range (where one is left), chosen at random."""
    below = range(LOWEST_PORT, ephemeral_low())
    for port in [*random.sample(below, min(64, len(below))), 0]:  # 0: the kernel's choice, where none below binds
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free loopback port")


def with_port(argv: list[str], port: int) -> list[str]:
    """argv with --port before any `--` (what follows it goes to vLLM's server unchanged)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    return [*argv[:cut], "--port", str(port), *argv[cut:]]


class Server:
    """A server process on a free loopback port, its output in a log file; stopped on exit."""

    def __init__(self, name: str, argv: list[str], folder: Path, timeout: float):
        self.name, self.port, self.log = name, free_port(), folder / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(with_port(argv, self.port), stdout=log, stderr=subprocess.STDOUT)
        t0, deadline = time.perf_counter(), time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            self.stop()
            raise RuntimeError(f"{name} did not start in {timeout:.0f} s: {self.tail()}")
        self.start_s = time.perf_counter() - t0

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
