"""Start a private InfluxDB 1.x server (Debian's ``influxd``) on free loopback ports.

Used by the ingest benchmark and the InfluxDB integration tests: a temp directory holds
meta, data and WAL; HTTP and RPC bind to 127.0.0.1 only; reporting, the ``_internal``
monitor store and request logging are off.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

_CONFIG = """reporting-disabled = true
bind-address = "127.0.0.1:{rpc}"

[meta]
  dir = "{root}/meta"

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false
  trace-logging-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http}"
  log-enabled = false
  pprof-enabled = false

[logging]
  level = "warn"
  suppress-logo = true
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class InfluxServer:
    """A throwaway ``influxd``; :meth:`start` / :meth:`stop` (restartable on the same
    ports and data directory, to simulate an outage)."""

    def __init__(self, binary: str = "influxd") -> None:
        path = shutil.which(binary)
        if path is None:
            raise FileNotFoundError(f"{binary} is not installed")
        self.binary = path
        self.root = Path(tempfile.mkdtemp(prefix="pm-influxd-"))
        self.http_port = _free_port()
        self.rpc_port = _free_port()
        self.config = self.root / "influxdb.conf"
        self.config.write_text(_CONFIG.format(root=self.root, rpc=self.rpc_port,
                                              http=self.http_port))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 20.0) -> None:
        log = (self.root / "influxd.log").open("ab")
        self.proc = subprocess.Popen([self.binary, "-config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while time.monotonic() < deadline:  # startup wait: bounded, backing off
            if self.proc.poll() is not None:
                raise RuntimeError(f"influxd exited with {self.proc.returncode}; see "
                                   f"{self.root / 'influxd.log'}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=1) as resp:
                    if resp.status == 204:
                        return
            except OSError:
                pass
            time.sleep(delay)
            delay = min(0.2, delay * 1.5)
        self.stop()
        raise TimeoutError("influxd did not answer /ping in time")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
