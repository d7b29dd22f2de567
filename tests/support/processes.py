"""Real peer processes for the integration tests: Faktory, Redis, the gateway.

Each class starts one process on loopback ports with its own scratch directory, waits until it
is ready, and stops it. Nothing here is mocked: the tests talk to the same binaries a user runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition, by its name and labels (in any order). Fails
    when it is missing: a test that reads 0 for a metric the gateway never exposed proves nothing."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        metric_name, _, label_text = sample.partition("{")
        if metric_name == name and dict(re.findall(r'(\w+)="([^"]*)"', label_text)) == labels:
            return float(value)
    raise AssertionError(f"no sample {name}{labels or ''} in the metrics")


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def faktory_binary() -> str:
    """The Faktory server built by scripts/install-test-deps.sh, or one named by FAKTORY_BIN."""
    for candidate in (
        os.environ.get("FAKTORY_BIN"),
        str(REPO / ".tools/bin/faktory"),
        shutil.which("faktory"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no faktory binary: run scripts/install-test-deps.sh (or set FAKTORY_BIN)")


class Process:
    """A child process whose output is collected, so a test can wait for a line or show it on failure."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.output: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._group_stopped = False
        self._changed = threading.Condition()

    def start(self) -> None:
        self.output = []
        self._group_stopped = False
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        threading.Thread(target=self._collect, args=(self.proc,), daemon=True).start()

    def _collect(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._changed:
                self.output.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.output:
                    if needle in line:
                        return line
                if self.proc.poll() is not None and not self._pending_output():
                    raise RuntimeError(f"{self.argv[0]} exited ({self.proc.returncode}):\n" + self.text())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no line containing {needle!r} from {self.argv[0]}:\n" + self.text())
                self._changed.wait(min(left, 0.2))

    def _pending_output(self) -> bool:
        return not self.proc.stdout.closed and self.proc.returncode is None

    def text(self) -> str:
        return "\n".join(self.output[-200:])

    def send_signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Stop the process and everything it started (its own session's process group): also
        when it died first, as a Faktory a test crashed does, leaving its private Redis running."""
        if not self.proc:
            return None
        if self._group_stopped:  # its id may belong to another group by now
            return self.proc.returncode
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass  # the group is empty: nothing left to stop
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._group_stopped = sig in (signal.SIGTERM, signal.SIGKILL)
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def pids_running(marker: str) -> list[int]:
    """The processes whose command line mentions `marker` (a path only they use)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if marker.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass  # gone meanwhile
    return found


class FaktoryServer(Process):
    """The real Faktory OSS server, with its private Redis, on a loopback port."""

    def __init__(self, password: str | None = None, tls_dir: str | None = None):
        self.port = free_port()
        self.web_port = free_port()
        self.password = password
        self.storage = tempfile.mkdtemp(prefix="faktory-data-")
        self._own_config_dir = tls_dir is None
        self.config_dir = tls_dir or tempfile.mkdtemp(prefix="faktory-conf-")
        env = {k: v for k, v in os.environ.items() if k != "FAKTORY_PASSWORD"}
        if password:
            env["FAKTORY_PASSWORD"] = password
        argv = [
            faktory_binary(),
            "-b", f"127.0.0.1:{self.port}",
            "-w", f"127.0.0.1:{self.web_port}",
            "-e", "development",
            "-d", self.storage,
            "-c", self.config_dir,
            "-l", "info",
        ]  # fmt: skip
        super().__init__(argv, env=env)

    def start(self) -> FaktoryServer:
        super().start()
        self.wait_for_line("listening at", timeout=30)
        return self

    def restart(self) -> FaktoryServer:
        """Start again on the same port with the same data, as after a crash."""
        self.stop()
        # A fresh storage dir would lose the jobs; the old one is reusable once its Redis is gone.
        return self.start()

    @property
    def url(self) -> str:
        scheme = "tcp+tls" if os.path.exists(os.path.join(self.config_dir, "public.cert.pem")) else "tcp"
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}"

    def cleanup(self) -> None:
        self.stop()
        # Faktory starts its Redis in a process group of its own: a Faktory that crashed (the
        # shield's tests crash it on purpose) leaves it running, out of reach of stop().
        for pid in pids_running(self.storage):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.storage, ignore_errors=True)
        if self._own_config_dir:
            shutil.rmtree(self.config_dir, ignore_errors=True)


def clockshift_library() -> str:
    """The test-only LD_PRELOAD library that steps a process's wall clock (tests/support/clockshift),
    built by scripts/install-test-deps.sh."""
    library = REPO / ".tools/lib/clockshift.so"
    if not library.exists():
        raise RuntimeError("no clockshift.so: run scripts/install-test-deps.sh")
    return str(library)


class RedisServer(Process):
    """Debian's redis-server on a loopback port; no persistence unless `persistent` (append-only
    file in its own directory, so a restart keeps the data, as a production Redis would).

    With `steppable_clock`, its wall clock can be stepped while it runs (`step_clock`), as NTP, a
    `date -s` or a failover to a host with another clock would: everything it reads from the clock
    (TIME, key expiry) moves; its monotonic clock does not."""

    def __init__(self, port: int | None = None, persistent: bool = False, steppable_clock: bool = False):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-")
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if persistent else "no",
            "--dir", self.dir,
        ]  # fmt: skip
        env = None
        self._shift_file: str | None = None
        if steppable_clock:
            self._shift_file = os.path.join(self.dir, "clockshift")
            self.step_clock(0.0)
            env = {**os.environ, "LD_PRELOAD": clockshift_library(), "CLOCKSHIFT_FILE": self._shift_file}
        super().__init__(argv, env=env)

    def step_clock(self, seconds: float) -> None:
        """Set this server's wall clock `seconds` away from the real one (a step, not a drift)."""
        assert self._shift_file is not None, "started without steppable_clock"
        # Rewritten in place, never truncated: the server maps the file, and reading a mapped page
        # past the end of a truncated file is a SIGBUS.
        fd = os.open(self._shift_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, int(seconds * 1e9).to_bytes(8, "little", signed=True), 0)
        finally:
            os.close(fd)

    def start(self) -> RedisServer:
        super().start()
        self.wait_for_line("Ready to accept connections", timeout=20)
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class GatewayProcess(Process):
    """The gateway as users run it: `python -m gateway` with flags."""

    def __init__(self, upstream: str, *extra: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.http_port = free_port()
        argv = [
            sys.executable, "-m", "gateway",
            "--listen", f"127.0.0.1:{self.port}",
            "--http-listen", f"127.0.0.1:{self.http_port}",
            "--upstream", upstream,
            *extra,
        ]  # fmt: skip
        full_env = {**os.environ, **(env or {})}
        super().__init__(argv, env=full_env, cwd=str(REPO))

    def start(self, timeout: float = 20.0) -> GatewayProcess:
        """Start and wait until /startup answers 200, as a Kubernetes startup probe would."""
        super().start()
        deadline = time.monotonic() + timeout
        while self.http_status("/startup") != 200:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.proc.returncode}):\n" + self.text())
            if time.monotonic() > deadline:
                status = self.http("/startup") if self.http_status("/startup") else "no answer"
                raise TimeoutError(f"gateway did not start: /startup {status}\n" + self.text())
            time.sleep(0.05)
        return self

    def http_status(self, path: str, method: str = "GET") -> int | None:
        try:
            return self.http(path, method)[0]
        except OSError:
            return None

    def metric(self, name: str, **labels: str) -> float:
        """One sample of this gateway's /metrics now (see `metric`)."""
        return metric(self.http("/metrics")[1], name, **labels)

    def http(self, path: str, method: str = "GET") -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


class RedisCluster:
    """A real Redis Cluster of three masters (no replicas) on loopback ports, each node in its own
    directory, made with `redis-cli --cluster create` as an operator would."""

    def __init__(self, masters: int = 3):
        self.ports = [free_port() for _ in range(masters)]
        self.bus_ports = [free_port() for _ in range(masters)]  # not port+10000: that one may be taken
        self.dir = tempfile.mkdtemp(prefix="redis-cluster-")
        self.nodes: list[Process] = []
        for port, bus in zip(self.ports, self.bus_ports, strict=True):
            node_dir = os.path.join(self.dir, str(port))
            os.mkdir(node_dir)
            argv = [
                shutil.which("redis-server") or "redis-server",
                "--port", str(port),
                "--cluster-port", str(bus),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", os.path.join(node_dir, f"nodes-{port}.conf"),
                "--save", "",
                "--appendonly", "no",
                "--dir", node_dir,
            ]  # fmt: skip
            self.nodes.append(Process(argv))

    def start(self, timeout: float = 30.0) -> RedisCluster:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_for_line("Ready to accept connections", timeout=20)
        cli = shutil.which("redis-cli") or "redis-cli"
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not all(self._state_ok(port) for port in self.ports):
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        return self

    @staticmethod
    def _state_ok(port: int) -> bool:
        cli = shutil.which("redis-cli") or "redis-cli"
        info = subprocess.run(
            [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=10
        )
        return "cluster_state:ok" in info.stdout

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def cleanup(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
