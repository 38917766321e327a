"""Real service processes for fault tests: start them, kill them, look inside.

Every process leads a session of its own, so it and its children can be
signalled as one group and nothing outlives a test.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import requests
from prometheus_client.parser import text_string_to_metric_families

from parking.ports import free_port
from tests.services import wait_until
from workers import topology

#: The checkout: the services run from it as an operator would.
REPO = Path(__file__).resolve().parents[1]


def fault_env(workdir: Path, **overrides: str) -> dict[str, str]:
    """The test environment with a CSV, ports and metrics directory of its own."""
    api_port = free_port()
    return {
        **os.environ,
        "PARKING_API_PORT": str(api_port),
        "PARKING_SUMMARY_API_URL": f"http://127.0.0.1:{api_port}",
        "PARKING_SUMMARY_CSV": str(workdir / "stays.csv"),
        "PARKING_VAR_DIR": str(workdir / "var"),
        "PARKING_WORKER_METRICS_PORT": str(free_port()),
        "PARKING_BEAT_METRICS_PORT": str(free_port()),
        "PARKING_INGEST_METRICS_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


class Service:
    """One command in its own process group, its output in a log file."""

    def __init__(self, name: str, command: list[str], env: Mapping[str, str]) -> None:
        self.name = name
        self.command = command
        self.env = dict(env)
        self.log_path = Path(self.env["PARKING_VAR_DIR"]).parent / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} not started"
        return self.process.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            self.command,
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, signum: signal.Signals) -> None:
        """Signal the whole process group (the service and its children)."""
        os.killpg(self.pid, signum)

    def stop(
        self, signum: signal.Signals = signal.SIGTERM, timeout: float = 30
    ) -> None:
        """Stop the whole group; whatever ignores ``signum`` is killed."""
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.send(signum)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if self._log is not None:
                self._log.close()
            self.process = None

    def log(self, since_start: bool = True) -> str:
        """What this run of the process wrote (or every run's, if not)."""
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        return data[self._log_offset if since_start else 0 :].decode("utf-8", "replace")

    def count(self, pattern: str, since_start: bool = False) -> int:
        return len(re.findall(pattern, self.log(since_start)))


class Worker(Service):
    """``celery -A workers worker`` with the prefork pool, as deployed."""

    def __init__(
        self, env: Mapping[str, str], concurrency: int = 2, name: str = "faults"
    ) -> None:
        prefix = env["PARKING_QUEUE_PREFIX"]
        queues = ",".join(f"{prefix}.{kind}" for kind in topology.KINDS)
        self.node = name
        # Prefork children count into files the parent serves, as deployed.
        metrics_dir = Path(env["PARKING_VAR_DIR"]) / f"prometheus-{name}"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        super().__init__(
            f"worker-{name}",
            [sys.executable, "-m", "celery", "-A", "workers", "worker",
             "-P", "prefork", "-c", str(concurrency), "-n", f"{name}@%h",
             "-Q", queues, "-l", "INFO", "--without-mingle", "--without-gossip"],
            env,
        )  # fmt: skip

    def start(self, timeout: float = 60) -> None:
        super().start()
        ready = re.compile(rf"{re.escape(self.node)}@\S+ ready\.")

        def is_ready() -> bool:
            if not self.alive():
                raise AssertionError(f"worker exited:\n{self.log()[-3000:]}")
            return bool(ready.search(self.log()))

        wait_until(is_ready, timeout=timeout, interval=0.1)

    def children(self) -> list[int]:
        """The pool's child processes, as the kernel lists them."""
        return children_of(self.pid)

    def metric(self, sample_name: str, /, **labels: str) -> float:
        """The sum of a metric's samples that carry ``labels``, as served now."""
        port = self.env["PARKING_WORKER_METRICS_PORT"]
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == sample_name and labels.items() <= sample.labels.items()
        )

    def lost_jobs(self) -> int:
        """Tasks that were running in a child when it died (all runs)."""
        return self.count(r"WorkerLostError\('Worker exited prematurely")


class Api(Service):
    """``python -m parking api``: the summary API alone, as the README runs it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        super().__init__("api", [sys.executable, "-m", "parking", "api"], env)
        self.port = int(self.env["PARKING_API_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        super().start()
        wait_until(self.healthy, timeout=timeout, interval=0.1)

    def healthy(self) -> bool:
        if not self.alive():
            raise AssertionError(f"summary API exited:\n{self.log()[-3000:]}")
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def metric(self, name: str) -> float:
        """One unlabelled sample from the API's own metrics endpoint."""
        text = requests.get(f"{self.url}/metrics", timeout=5).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0


class Beat(Service):
    """``celery -A workers beat`` with a schedule file of its own."""

    def __init__(self, env: Mapping[str, str]) -> None:
        schedule = Path(env["PARKING_VAR_DIR"]) / "celerybeat-schedule"
        super().__init__(
            "beat",
            [sys.executable, "-m", "celery", "-A", "workers", "beat", "-l", "INFO",
             "-s", str(schedule)],
            env,
        )  # fmt: skip

    def start(self, timeout: float = 30) -> None:
        Path(self.env["PARKING_VAR_DIR"]).mkdir(parents=True, exist_ok=True)
        super().start()
        wait_until(lambda: "beat: Starting" in self.log(), timeout=timeout)


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(n) for n in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return inodes


def _established_to(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01":  # ESTABLISHED
                inodes.add(fields[9])
    return inodes


def connected_to(pid: int, port: int) -> bool:
    """Whether the process holds an open TCP connection to ``port``."""
    return bool(_socket_inodes(pid) & _established_to(port))


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def elapsed(since: float) -> float:
    return round(time.monotonic() - since, 1)


class TcpProxy:
    """A local port forwarded to a server, which the test can cut and restore.

    Cutting closes every forwarded connection and the listening socket, so
    clients see their connections drop and new ones refused, as when the
    server goes away; restoring listens on the same port again.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            doomed = [*self._open, *([self._listener] if self._listener else [])]
            self._open.clear()
            self._listener = None
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pipe, args=(source, sink), daemon=True
                ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.difference_update((source, sink))
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
