"""The container image and the compose stack, run for real (issue 12). Driven by scripts/image-smoke.sh.

    FGW_IMAGE=faktory-gateway:ci DOCKER=/usr/bin/docker .venv/bin/python -m tests.image.smoke

Needs a running Docker engine that already holds FGW_IMAGE, debian:bookworm-slim and the CI images
of tests/image/*.Dockerfile (the script builds them). Every check either holds or ends the run with
exit status 1 and a line saying which check failed and why; nothing is skipped.

The image: runs as UID 65532 with a read-only root filesystem and the gateway as PID 1; `--help`
and `--check-config` work and a bad setting exits 2 naming the key; with `--network host` in front
of the real Faktory and Redis the tests use, a job goes in and comes out through it; in front of the
Ent stand-in, a push into a committed batch is refused with BATCH_COMMITTED; `/metrics` and
`/readiness` answer; `docker stop` ends it with status 0 within the grace period.

The compose stack: deploy/compose.yaml with tests/image/compose.ci.yaml (local images, free host
ports, the Ent stand-in between the gateways and Faktory) comes up; the demo producers' jobs reach
Faktory through both gateways; a push into a batch committed through one gateway is refused through
either; `down -v` leaves no container, network or volume behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.support.client import RawClient, job, push_line, uid
from tests.support.locks import lock_pins, normalize
from tests.support.processes import FaktoryServer, RedisServer, free_port, metric
from tests.support.standin import StandinProcess

REPO = Path(__file__).resolve().parents[2]
DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
COMPOSE = os.environ.get("DOCKER_COMPOSE", "/usr/bin/docker-compose")
IMAGE = os.environ.get("FGW_IMAGE", "faktory-gateway:ci")
COMPOSE_IMAGE = "faktory-gateway:dev"  # the tag deploy/compose.yaml gives the image it builds
UID = 65532
STOP_GRACE = 30  # seconds, as compose.yaml's stop_grace_period; the gateway must exit well within it


class Failed(Exception):
    pass


def check(condition: object, message: str) -> None:
    if not condition:
        raise Failed(message)


def run(
    *argv: str, timeout: float = 120, ok: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if ok and result.returncode != 0:
        raise Failed(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def docker(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(DOCKER, *args, **kwargs)


def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_until(what: str, predicate: Callable[[], object], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def new_batch(client: RawClient) -> str:
    bid = client.value("BATCH NEW " + json.dumps({"success": {"jobtype": "SmokeDone", "queue": "smoke-cb"}}))
    check(bid, "BATCH NEW returned no bid")
    return bid.decode()


def batch_push(client: RawClient, bid: str, queue: str) -> bytes:
    return client.call(push_line(job(uid(), queue=queue, custom={"bid": bid})))


# ---------------------------------------------------------------------------------------------
# The image alone


class Gateway:
    """The image started with --network host on free loopback ports, as a sidecar would run it."""

    def __init__(self, name: str, upstream: str, redis: str):
        self.name = f"fgw-smoke-{name}-{os.getpid()}"
        self.port, self.http_port = free_port(), free_port()
        self.upstream, self.redis = upstream, redis

    def start(self) -> Gateway:
        docker(
            "run", "-d", "--name", self.name, "--network", "host",
            "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--pull", "never", IMAGE,
            "--listen", f"127.0.0.1:{self.port}", "--http-listen", f"127.0.0.1:{self.http_port}",
            "--upstream", self.upstream, "--redis", self.redis,
        )  # fmt: skip
        wait_until(
            f"{self.name}'s /startup", lambda: self.running() and http(self.http_port, "/startup")[0] == 200
        )
        return self

    def running(self) -> bool:
        state = json.loads(docker("inspect", "-f", "{{json .State}}", self.name).stdout)
        if not state["Running"]:
            raise Failed(f"{self.name} exited ({state['ExitCode']}):\n{self.logs()}")
        return True

    def logs(self) -> str:
        result = docker("logs", "--tail", "60", self.name, ok=False)
        return result.stdout + result.stderr

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def remove(self) -> None:
        docker("rm", "-f", self.name, ok=False)


def check_image_metadata() -> str:
    (info,) = json.loads(docker("image", "inspect", IMAGE).stdout)
    config = info["Config"]
    check(config["User"] == f"{UID}:{UID}", f"image user is {config['User']!r}, not {UID}:{UID}")
    check(config["Entrypoint"] == ["faktory-gateway"], f"entrypoint {config['Entrypoint']}")
    check(sorted(config["ExposedPorts"]) == ["7419/tcp", "9419/tcp"], f"exposed {config['ExposedPorts']}")
    uid = docker("run", "--rm", "--read-only", "--entrypoint", "id", IMAGE, "-u").stdout.strip()
    check(uid == str(UID), f"the image runs as uid {uid}")
    probe = "import sys, importlib.util as u; print(sys.version.split()[0], u.find_spec('pip') is None)"
    version, no_pip = docker("run", "--rm", "--entrypoint", "python", IMAGE, "-c", probe).stdout.split()
    check(no_pip == "True", "pip is installed in the image")
    return f"Python {version}, no pip, {info['Size'] / 1e6:.0f} MB"


def check_image_contents() -> str:
    """The venv holds exactly the locked releases and the gateway: two builds get the same packages."""
    probe = (
        "import importlib.metadata as m; print(' '.join(f'{d.name}=={d.version}' for d in m.distributions()))"
    )
    installed = docker("run", "--rm", "--entrypoint", "python", IMAGE, "-c", probe).stdout.split()
    installed = {normalize(name): version for name, version in (item.split("==") for item in installed)}
    locked = {
        name: version for name, (version, _) in lock_pins(REPO / "packaging/image-requirements.txt").items()
    }
    gateway = installed.pop("faktory-gateway", None)
    check(gateway, "the gateway is not installed in the image")
    check(
        installed == locked,
        f"the image's packages differ from the lock: {set(installed.items()) ^ set(locked.items())}",
    )
    debs = docker(
        "run", "--rm", "--entrypoint", "dpkg-query", IMAGE, "-W", "-f", "${Package}\n"
    ).stdout.split()
    return f"faktory-gateway {gateway} and the {len(locked)} locked packages, {len(debs)} Debian packages"


def check_help_and_check_config() -> str:
    result = docker("run", "--rm", "--read-only", IMAGE, "--help")
    check("--upstream" in result.stdout and "--check-config" in result.stdout, "--help lists no --upstream")
    env = ["-e", "FAKTORY_GATEWAY_UPSTREAM=tcp://faktory:7419"]
    docker("run", "--rm", "--read-only", *env, IMAGE, "--check-config")
    bad = docker("run", "--rm", "--read-only", *env, "-e", "FAKTORY_GATEWAY_MODE=loose", IMAGE,
                 "--check-config", ok=False)  # fmt: skip
    check(bad.returncode == 2, f"a bad mode exits {bad.returncode}, not 2")
    check("mode" in bad.stdout + bad.stderr, f"the error does not name the key: {bad.stdout}{bad.stderr}")
    missing = docker("run", "--rm", "--read-only", IMAGE, "--check-config", ok=False)
    check(
        missing.returncode == 2 and "upstream" in missing.stdout + missing.stderr, "no upstream is accepted"
    )
    return "--help, --check-config, exit 2 naming `mode` and `upstream`"


def check_container_posture(gateway: Gateway) -> str:
    (info,) = json.loads(docker("inspect", gateway.name).stdout)
    check(info["HostConfig"]["ReadonlyRootfs"] is True, "the root filesystem is not read-only")
    uid = docker("exec", gateway.name, "id", "-u").stdout.strip()
    check(uid == str(UID), f"the gateway runs as uid {uid}")
    write = docker("exec", gateway.name, "touch", "/opt/faktory-gateway/written", ok=False)
    check(write.returncode != 0 and "Read-only file system" in write.stderr, f"a write succeeded: {write}")
    cmdline = docker("exec", gateway.name, "cat", "/proc/1/cmdline").stdout.replace("\0", " ")
    check("faktory-gateway" in cmdline, f"PID 1 is {cmdline!r}, not the gateway")
    return f"uid {uid}, read-only root, PID 1 is the gateway"


def check_push_and_fetch(gateway: Gateway) -> str:
    queue, jid = "smoke-" + uid(), uid()
    with RawClient.connect(gateway.url) as client:
        check(client.call(push_line(job(jid, queue=queue))) == b"+OK\r\n", "PUSH through the gateway")
        fetched = client.json(f"FETCH {queue}")
        check(fetched["jid"] == jid, f"fetched {fetched}, not {jid}")
        check(client.call('ACK {"jid": "%s"}' % jid) == b"+OK\r\n", "ACK through the gateway")
    return f"job {jid[:8]} pushed and fetched"


def check_batch_refused(gateway: Gateway, standin: StandinProcess) -> str:
    queue = "smoke-" + uid()
    with RawClient.connect(gateway.url) as client:
        bid = new_batch(client)
        check(batch_push(client, bid, queue) == b"+OK\r\n", "a push into the open batch")
        check(client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n", "BATCH COMMIT")
        refused = batch_push(client, bid, queue)
        check(refused.startswith(b"-ERR BATCH_COMMITTED"), f"a push into a committed batch got {refused!r}")
    audit = standin.report()[bid]
    check(audit["total"] == 1 and audit["joined_while_committed"] == 0, f"the stand-in saw {audit}")
    return f"batch {bid}: {refused.decode().strip()[:40]}..."


def check_http(gateway: Gateway) -> str:
    status, _ = http(gateway.http_port, "/readiness")
    check(status == 200, f"/readiness answered {status}")
    status, text = http(gateway.http_port, "/metrics")
    check(status == 200, f"/metrics answered {status}")
    pushes = metric(text, "faktory_gateway_commands_total", verb="PUSH", result="ok")
    check(pushes >= 1, f"/metrics counts {pushes} PUSH")
    return f"/readiness 200, /metrics counts {pushes:.0f} PUSH"


def check_stop(gateway: Gateway) -> str:
    # An idle client stays connected: the drain closes it, it does not wait for the grace period.
    with RawClient.connect(gateway.url):
        started = time.monotonic()
        docker("stop", "-t", str(STOP_GRACE), gateway.name, timeout=STOP_GRACE + 30)
        elapsed = time.monotonic() - started
    code = docker("inspect", "-f", "{{.State.ExitCode}}", gateway.name).stdout.strip()
    check(code == "0", f"docker stop: exit status {code}:\n{gateway.logs()}")
    check(elapsed < STOP_GRACE, f"docker stop took {elapsed:.1f} s, the grace period is {STOP_GRACE} s")
    return f"exit 0 after {elapsed:.1f} s (grace {STOP_GRACE} s)"


Checks = list[tuple[str, Callable[[], str]]]


def image_checks() -> tuple[Checks, Callable[[], None], Callable[[], str]]:
    peers: list = []
    gateways: list[Gateway] = []
    faktory = redis = standin = None

    def start_peers() -> str:
        nonlocal faktory, redis, standin
        faktory = FaktoryServer()
        peers.append(faktory)
        faktory.start()
        redis = RedisServer()
        peers.append(redis)
        redis.start()
        standin = StandinProcess(faktory.url)
        peers.append(standin)
        standin.start()
        return f"Faktory {faktory.url}, Redis {redis.url}, stand-in {standin.url}"

    def start(name: str, upstream: Callable[[], str]) -> Callable[[], str]:
        def go() -> str:
            gateway = Gateway(name, upstream(), redis.url)
            gateways.append(gateway)
            gateway.start()
            return f"{gateway.name} on {gateway.url}"

        return go

    def cleanup() -> None:
        for gateway in gateways:
            gateway.remove()
        for peer in reversed(peers):
            if hasattr(peer, "cleanup"):
                peer.cleanup()
            else:
                peer.stop()

    def logs() -> str:
        return "\n".join(f"--- {g.name}:\n{g.logs()}" for g in gateways)

    return (
        [
            ("image metadata", check_image_metadata),
            ("image contents", check_image_contents),
            ("--help and --check-config", check_help_and_check_config),
            ("real Faktory, Redis and the Ent stand-in", start_peers),
            ("gateway in front of Faktory", start("faktory", lambda: faktory.url)),
            ("non-root, read-only, PID 1", lambda: check_container_posture(gateways[0])),
            ("push and fetch a job", lambda: check_push_and_fetch(gateways[0])),
            ("/readiness and /metrics", lambda: check_http(gateways[0])),
            ("gateway in front of the Ent stand-in", start("standin", lambda: standin.url)),
            ("committed batch refused", lambda: check_batch_refused(gateways[1], standin)),
            ("docker stop", lambda: check_stop(gateways[0])),
            ("docker stop (stand-in gateway)", lambda: check_stop(gateways[1])),
        ],
        cleanup,
        logs,
    )


# ---------------------------------------------------------------------------------------------
# The compose stack


class Stack:
    def __init__(self):
        self.project = f"fgw-smoke-{os.getpid()}"
        ports = {name: free_port() for name in ("WEB", "GATEWAY_A", "GATEWAY_B", "METRICS_A", "METRICS_B")}
        self.ports = ports
        self.env = {f"FGW_DEMO_{name}_PORT": str(port) for name, port in ports.items()}
        self.files = [
            "-f",
            str(REPO / "deploy/compose.yaml"),
            "-f",
            str(REPO / "tests/image/compose.ci.yaml"),
        ]

    def compose(self, *args: str, timeout: float = 180, ok: bool = True) -> subprocess.CompletedProcess:
        return run(COMPOSE, *self.files, "-p", self.project, *args, timeout=timeout, ok=ok, env=self.env)

    def gateway_url(self, which: str) -> str:
        return f"tcp://127.0.0.1:{self.ports['GATEWAY_' + which]}"

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            kind: docker(*cmd, "--filter", label).stdout.split()
            for kind, cmd in (
                ("containers", ("ps", "-aq")),
                ("networks", ("network", "ls", "-q")),
                ("volumes", ("volume", "ls", "-q")),
            )
        }


def pushed_jids(stack: Stack, service: str) -> set[str]:
    logs = stack.compose("logs", "--no-color", service).stdout
    return set(re.findall(r"PUSH ([0-9a-f]{32}) \+OK", logs))


def compose_checks() -> tuple[Checks, Callable[[], None], Callable[[], str]]:
    stack = Stack()

    def up() -> str:
        docker("tag", IMAGE, COMPOSE_IMAGE)
        stack.compose("config", "-q")
        stack.compose("up", "-d", "--no-build")

        def healthy() -> bool:
            ids = stack.compose("ps", "-q", "gateway-a", "gateway-b").stdout.split()
            states = [docker("inspect", "-f", "{{.State.Health.Status}}", i).stdout.strip() for i in ids]
            return len(states) == 2 and all(s == "healthy" for s in states)

        wait_until("both gateways healthy", healthy, timeout=90)
        return f"project {stack.project}, gateways on {stack.gateway_url('A')} and {stack.gateway_url('B')}"

    def producers_reach_faktory() -> str:
        a = wait_until("a job pushed by producer-a", lambda: pushed_jids(stack, "producer-a"))
        b = wait_until("a job pushed by producer-b", lambda: pushed_jids(stack, "producer-b"))
        fetched: set[str] = set()
        with RawClient.connect(stack.gateway_url("A")) as client:
            deadline = time.monotonic() + 30
            while not (a <= fetched and b <= fetched):
                check(time.monotonic() < deadline, f"jobs never reached Faktory: {(a | b) - fetched}")
                raw = client.value("FETCH default")  # None when the queue stayed empty for 2 s
                if raw:
                    work = json.loads(raw)
                    check(work["jobtype"] == "demo", f"an unexpected job {work}")
                    fetched.add(work["jid"])
                    check(client.call('ACK {"jid": "%s"}' % work["jid"]) == b"+OK\r\n", "ACK")
        for which in ("A", "B"):
            _, text = http(stack.ports["METRICS_" + which], "/metrics")
            pushes = metric(text, "faktory_gateway_commands_total", verb="PUSH", result="ok")
            check(pushes >= 1, f"gateway-{which.lower()} relayed {pushes} PUSH")
        return f"{len(a)} jobs via gateway-a and {len(b)} via gateway-b fetched from Faktory"

    def batch_rules_across_gateways() -> str:
        results = []
        for creator, other in (("A", "B"), ("B", "A")):
            with RawClient.connect(stack.gateway_url(creator)) as owner:
                bid = new_batch(owner)
                check(batch_push(owner, bid, "smoke") == b"+OK\r\n", "a push into the open batch")
                check(owner.call(f"BATCH COMMIT {bid}") == b"+OK\r\n", "BATCH COMMIT")
                for via in (creator, other):
                    with RawClient.connect(stack.gateway_url(via)) as client:
                        reply = batch_push(client, bid, "smoke")
                    check(
                        reply.startswith(b"-ERR BATCH_COMMITTED"), f"gateway-{via.lower()} answered {reply!r}"
                    )
                    results.append(via)
        for which in ("A", "B"):
            _, text = http(stack.ports["METRICS_" + which], "/metrics")
            refused = metric(text, "faktory_gateway_refusals_total", code="BATCH_COMMITTED")
            check(refused == 2, f"gateway-{which.lower()} counts {refused} BATCH_COMMITTED, not 2")
        return "committed through one gateway, refused through both (4 of 4)"

    def down() -> str:
        stack.compose("down", "-v", "--timeout", str(STOP_GRACE))
        left = stack.leftovers()
        check(not any(left.values()), f"left behind after down -v: {left}")
        return "no container, network or volume left"

    def cleanup() -> None:
        if any(stack.leftovers().values()):
            stack.compose("down", "-v", "--timeout", "5", ok=False)
        check(not any(stack.leftovers().values()), f"left behind: {stack.leftovers()}")

    def show_logs() -> str:
        return stack.compose("logs", "--no-color", "--tail", "30", ok=False).stdout

    return (
        [
            ("compose up", up),
            ("demo producers' jobs reach Faktory through both gateways", producers_reach_faktory),
            ("a batch violation through either gateway", batch_rules_across_gateways),
            ("compose down -v", down),
        ],
        cleanup,
        show_logs,
    )


def main() -> int:
    started = time.monotonic()
    failed = False
    for section, (checks, cleanup, logs) in (("image", image_checks()), ("compose", compose_checks())):
        try:
            for name, fn in checks:
                t0 = time.monotonic()
                detail = fn()
                print(f"ok   {section}: {name}: {detail} ({time.monotonic() - t0:.1f} s)", flush=True)
        except (Failed, subprocess.TimeoutExpired, OSError, RuntimeError, AssertionError, KeyError) as error:
            failed = True
            print(f"FAIL {section}: {name}: {type(error).__name__}: {error}", flush=True)
            print(logs(), flush=True)
        finally:
            try:
                cleanup()
            except Exception as error:  # a failed cleanup fails the run
                failed = True
                print(f"FAIL {section}: cleanup: {error}", flush=True)
        if failed:
            break
    total = time.monotonic() - started
    print(("FAILED" if failed else "passed") + f": image smoke test ({total:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
