"""A RabbitMQ cluster of our own on loopback, from Debian's ``rabbitmq-server``: for the
cluster benchmark and its integration test.

Each node gets a distinct node name (``pm<i>-<run>@localhost``), AMQP and distribution
ports (free ports), its own data, log and config files in a temp dir, no plugins (an empty
enabled-plugins file) and the one Erlang cookie of the run (``HOME`` points at the temp
dir, ``.erlang.cookie`` mode 400). Nodes start in parallel; nodes 2..n then join node 1
one after the other (``rabbitmqctl -n ... stop_app; join_cluster; start_app``). Every node
runs in a process group of its own, so a node is killed (``kill -9``, a crash) and torn
down by its process id; the machine's default node (``rabbit@localhost`` on 5672) is left
alone (the shared ``epmd`` on 4369 is used, not owned). Each node is small: one scheduler
(``+S 1:1``), no busy waiting, a low disk limit. Every wait is bounded.

    async with RabbitCluster(3) as cluster:
        cluster.hosts        # ["127.0.0.1:PORT1", ...] for AmqpConfig.hosts
        await cluster.kill(1)
        await cluster.restart(1)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from bench._chaos_env import free_port, port_open, proc_cpu_seconds, wait_until

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
ERL_ARGS = ("+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none +A 4 "
            "-kernel inet_dist_use_interface {127,0,0,1}")


def rabbitmq_missing() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    for exe in ("rabbitmq-server", "rabbitmqctl"):
        if not (RABBIT_BIN / exe).exists():
            return f"{RABBIT_BIN / exe} is not installed (Debian package rabbitmq-server)"
    if shutil.which("erl") is None:
        return "erl (Erlang) is not installed"
    return None


class RabbitError(RuntimeError):
    """The cluster could not be started or changed (with the node's log tail)."""


class RabbitNode:
    """One node: its files, ports and process group."""

    def __init__(self, root: Path, index: int, run: str) -> None:
        self.index = index
        self.short = f"pm{index}-{run}"
        self.nodename = f"{self.short}@localhost"
        self.dir = root / self.short
        self.port = free_port()
        self.dist_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.starts = 0
        self.cpu_s = 0.0  # CPU of finished incarnations (the whole process group)

    def env(self, home: Path) -> dict[str, str]:
        base = self.dir
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS,
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def write_files(self) -> None:
        (self.dir / "log").mkdir(parents=True, exist_ok=True)
        (self.dir / "mnesia").mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "advanced.config").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.1 = 127.0.0.1:{self.port}",
            "disk_free_limit.absolute = 50MB",
            "collect_statistics_interval = 60000",
            "log.console = false",
            "log.file.level = warning",
            # a cut node must not keep accepting publishes the majority cannot see
            "cluster_partition_handling = pause_minority",
        ]) + "\n")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_now(self) -> float:
        """CPU seconds of every incarnation (the live one read from /proc now)."""
        live = 0.0
        if self.alive and self.proc is not None:
            live = sum(proc_cpu_seconds(pid) for pid in _group_pids(self.proc.pid))
        return self.cpu_s + live

    def log_tail(self, n: int = 15) -> str:
        logs = sorted((self.dir / "log").glob("*.log"))
        out: list[str] = []
        for f in [*logs, self.dir / "stdout.log"]:
            with contextlib.suppress(OSError):
                out += f.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(out[-n:])


def _group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (from /proc)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[2]) == pgid:
                pids.append(int(entry.name))
    return pids


class RabbitCluster:
    """``n`` RabbitMQ nodes clustered on loopback; see the module docstring."""

    def __init__(self, n: int = 3, *, workdir: Path | None = None,
                 start_timeout_s: float = 120.0) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        self.run = uuid.uuid4().hex[:6]
        self._own_dir = workdir is None
        self.root = Path(tempfile.mkdtemp(prefix="pm-rabbit-")) if workdir is None else workdir
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes = [RabbitNode(self.root, i + 1, self.run) for i in range(n)]
        self.start_timeout_s = start_timeout_s
        self.start_s = 0.0  # wall time the cluster took to form

    # -- addresses -----------------------------------------------------------------------
    @property
    def hosts(self) -> list[str]:
        """``host:port`` of every node's AMQP listener (for ``AmqpConfig.hosts``)."""
        return [f"127.0.0.1:{n.port}" for n in self.nodes]

    # -- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> RabbitCluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every node in parallel, join them to node 1, wait until all run."""
        why = rabbitmq_missing()
        if why:
            raise RabbitError(why)
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout_s
        cookie = self.root / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (self.root / "rabbitmq-env.conf").write_text("# empty: no machine-wide settings\n")
        for node in self.nodes:
            node.write_files()
            self._spawn(node)
        await asyncio.gather(*(self._wait_up(n, deadline) for n in self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:  # one at a time: concurrent joins can race in mnesia
            await self._join(node, first, deadline)
        await asyncio.gather(*(self._wait_up(n, deadline) for n in self.nodes))
        self.start_s = time.monotonic() - t0

    def _spawn(self, node: RabbitNode) -> None:
        out = open(node.dir / "stdout.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            node.proc = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")], env=node.env(self.root),
                cwd=str(node.dir), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        node.starts += 1

    async def _wait_up(self, node: RabbitNode, deadline: float) -> None:
        """Until the node's AMQP port answers (its listener starts last), bounded."""
        while time.monotonic() < deadline:
            if not node.alive:
                raise RabbitError(f"{node.nodename} exited while starting:\n{node.log_tail()}")
            if port_open(node.port):
                return
            await asyncio.sleep(0.2)
        raise RabbitError(f"{node.nodename} did not listen on {node.port} in time:\n"
                          f"{node.log_tail()}")

    async def ctl(self, node: RabbitNode, *args: str, timeout_s: float = 60.0) -> str:
        """``rabbitmqctl -n NODE ARGS`` with this cluster's cookie; output or RabbitError."""
        env = node.env(self.root)
        ctl_port = free_port()  # the CLI's own distribution port (not the shared range)
        env["RABBITMQ_CTL_DIST_PORT_MIN"] = env["RABBITMQ_CTL_DIST_PORT_MAX"] = str(ctl_port)
        p = await asyncio.create_subprocess_exec(
            str(RABBIT_BIN / "rabbitmqctl"), "-n", node.nodename, *args, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(p.communicate(), timeout_s)
        except TimeoutError:
            p.kill()
            await p.wait()
            raise RabbitError(f"rabbitmqctl {' '.join(args)} on {node.nodename} timed out "
                              f"after {timeout_s:.0f}s") from None
        text = out.decode(errors="replace")
        if p.returncode != 0:
            raise RabbitError(f"rabbitmqctl {' '.join(args)} on {node.nodename} failed "
                              f"({p.returncode}): {text.strip()[-600:]}")
        return text

    async def _join(self, node: RabbitNode, first: RabbitNode, deadline: float) -> None:
        left = lambda: max(5.0, deadline - time.monotonic())  # noqa: E731
        await self.ctl(node, "stop_app", timeout_s=left())
        await self.ctl(node, "join_cluster", first.nodename, timeout_s=left())
        await self.ctl(node, "start_app", timeout_s=left())

    async def running_nodes(self, via: int = 0) -> list[str]:
        """The running members as node ``via`` sees them (``rabbitmqctl eval``)."""
        out = await self.ctl(self.nodes[via], "eval", "rabbit_nodes:all_running().",
                             timeout_s=30)
        return sorted(t.strip(" []'\n") for t in out.split(",") if "@" in t)

    async def kill(self, index: int, *, stall_s: float = 0.0) -> None:
        """SIGKILL node ``index`` (0-based) and every process of its group: a crash.
        ``stall_s`` > 0: freeze it (SIGSTOP) that long first, so it dies holding work
        (unconfirmed publishes, unacked deliveries) as a hung machine would."""
        node = self.nodes[index]
        if stall_s > 0 and node.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(stall_s)
        await self._stop_node(node, signal.SIGKILL)
        node.kills += 1

    async def restart(self, index: int, limit_s: float = 90.0) -> None:
        """Start a killed node again on its own data (it rejoins its cluster)."""
        node = self.nodes[index]
        if node.alive:
            return
        self._spawn(node)
        await self._wait_up(node, time.monotonic() + limit_s)

    async def _stop_node(self, node: RabbitNode, sig: int) -> None:
        p = node.proc
        if p is None:
            return
        pids = _group_pids(p.pid)
        node.cpu_s += sum(proc_cpu_seconds(pid) for pid in pids)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)  # the group we created for this node, by its id
        try:
            await asyncio.to_thread(p.wait, 15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            await asyncio.to_thread(p.wait, 10)
        # helpers of the group (erl_child_setup, inet_gethost) follow beam within a moment
        await wait_until(lambda: not _group_pids(p.pid), 5, step=0.05)
        node.proc = None

    async def stop(self) -> None:
        """Kill every node (by process group) and remove the files."""
        await asyncio.gather(*(self._stop_node(n, signal.SIGKILL) for n in self.nodes),
                             return_exceptions=True)
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def cpu_seconds(self) -> float:
        return sum(n.cpu_now() for n in self.nodes)
