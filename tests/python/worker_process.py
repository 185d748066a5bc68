"""Starts a real pkv-worker on 127.0.0.1 port 0 for the Python tests and stops it.

The worker binary comes from $PKV_WORKER_BIN (CTest sets it) or build/bin/pkv-worker; its
backend from $PKV_TEST_BACKEND (default cpu; cuda on a GPU host).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
LISTENING = re.compile(r"pkv-worker listening on (\S+):(\d+)")


def worker_binary() -> str:
    return os.environ.get("PKV_WORKER_BIN", os.path.join(REPO, "build", "bin", "pkv-worker"))


class WorkerProcess:
    """A pkv-worker process serving on loopback; `target` is "127.0.0.1:PORT"."""

    def __init__(self, *, num_layers: int = 2, num_q_heads: int = 4, num_kv_heads: int = 2,
                 head_dim: int = 64, page_size: int = 16, dtype: str = "fp16", num_pages: int = 256,
                 port: int = 0, extra_flags: tuple[str, ...] = ()) -> None:
        self.flags = [
            f"--listen=127.0.0.1:{port}", "--metrics_listen=127.0.0.1:0",
            f"--backend={os.environ.get('PKV_TEST_BACKEND', 'cpu')}",
            f"--num_layers={num_layers}", f"--num_q_heads={num_q_heads}",
            f"--num_kv_heads={num_kv_heads}", f"--head_dim={head_dim}", f"--page_size={page_size}",
            f"--dtype={dtype}", f"--num_pages={num_pages}", "--cpu_threads=1",
            "--shutdown_grace_s=1", *extra_flags]
        self.proc = subprocess.Popen([worker_binary(), *self.flags], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self.target = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
            match = LISTENING.search(line)
            if match:
                self.target = f"{match.group(1)}:{match.group(2)}"
                self.port = int(match.group(2))
                break
        if not self.target:
            self.proc.kill()
            raise RuntimeError("pkv-worker did not report its port:\n" + "".join(self.log))
        # Keep reading its output so that the pipe never fills.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def stop(self) -> int:
        """SIGTERM (the worker drains), then waits; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
