"""Benchmark: the same workloads direct to Faktory and through the gateway, in one run.

    python bench/run.py                       # everything, about 5 minutes
    python bench/run.py --duration 5 --rounds 4 --scenarios push16,lat-push
    python bench/run.py --profile push16      # also py-spy the gateway under that load afterwards

Throughput rounds alternate the targets (direct, gateway, bare relay, HAProxy) in ABBA order
(D G R H H R G D ...) so drift hits all alike; the latency scenarios alternate per block of commands
inside one generator process. The load comes from bench/loadgen.py in its own process. See
bench/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.lib, tests.support

from bench import lag
from bench.lib import load, profiling
from bench.lib.load import LoadSpec, Mode, abba, take_latencies
from bench.lib.process import children_of, raise_nofile, rss_kib, set_affinity, stop_all
from bench.lib.proxies import HAProxyProcess, RelayProcess
from bench.lib.report import RESULTS, Target, fmt, heading, log, percentiles, write_json
from tests.support.client import RawClient
from tests.support.processes import FaktoryServer, GatewayProcess, RedisServer
from tests.support.standin import StandinProcess

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("push1", "push16", "push16-pinned", "fetch16", "fetch16-1k", "lat-push", "lat-beat", "idle",
             "loop-lag", "batch")  # fmt: skip
FETCH_1K_PAYLOAD = 1024  # bytes of padding per job in fetch16-1k: a job of about 1.1 KiB
PROXIES = ("gateway", "relay", "haproxy")  # the processes a target's commands pass through
# Issue 10's targets are stated against HAProxy (and the bare relay for CPU); batch's against direct.
TARGETS = {
    "push16_vs_haproxy": 0.9,  # gateway ops/s >= 0.9x HAProxy's
    "push16_cpu_vs_relay": 1.15,  # gateway CPU per command <= 1.15x the relay's
    "fetch16_vs_haproxy": 0.9,  # fetch16 and fetch16-1k
    "lat_p50_over_haproxy_us": 15.0,  # gateway p50 <= HAProxy p50 + 15 µs (lat-push, lat-beat)
    "lat_p99_over_haproxy_us": 100.0,  # gateway p99 <= HAProxy p99 + 100 µs
    "idle_kib_per_conn": 8.0,
    # Issue 9: batch PUSHes through the fence against the gateway's own plain PUSHes, same run.
    "batch_vs_plain": 0.9,  # batch16 ops/s >= 0.9x push16-ledger's, both through the gateway
    "batch_cpu_vs_plain": 1.3,  # gateway CPU per batch PUSH <= 1.3x per plain PUSH
    "batch_redis_calls": 0.05,  # ledger Redis calls per batch PUSH, scripts' inner calls counted
}


# ------------------------------------------------------------------------------------------------
# The benchmark: its processes, the loads through them, the scenarios


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.faktory: FaktoryServer | None = None
        self.gateway: GatewayProcess | None = None
        self.relay: RelayProcess | None = None
        self.haproxy: HAProxyProcess | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="fgw-bench-"))
        self.results: list[dict] = []
        self.notes: list[str] = []
        self.profile_result: dict | None = None
        self.fill_rate = 30000.0  # jobs/s guess for sizing the FETCH queue; updated by measurement

    # --------------------------------------------------------------------------------------------
    def start(self) -> None:
        log("starting Faktory")
        self.faktory = FaktoryServer().start()
        self.faktory_pids = [self.faktory.proc.pid, *children_of(self.faktory.proc.pid)]
        log(f"Faktory pid {self.faktory_pids[0]} (+ its Redis {self.faktory_pids[1:]}); starting the gateway")
        self.gateway = GatewayProcess(self.faktory.url, *self.args.gateway_flag).start()
        log(f"gateway pid {self.gateway.proc.pid} on {self.gateway.url}")
        if not self.args.no_relay:
            self.relay = RelayProcess(self.faktory.port).start()
            log(f"bare relay pid {self.relay.proc.pid} on {self.relay.url}")
        if self.args.no_haproxy:
            pass
        elif not HAProxyProcess.available():
            self.notes.append("no haproxy on PATH (scripts/install-test-deps.sh installs it): HAProxy rows "
                              "and the targets stated against it are skipped")  # fmt: skip
        else:
            self.haproxy = HAProxyProcess(self.faktory.port).start()
            log(f"haproxy pid {self.haproxy.proc.pid} on {self.haproxy.url} (mode tcp, nbthread 1)")

    def stop(self) -> None:
        stop_all(self.haproxy, self.relay, self.gateway, self.faktory)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def references(self) -> dict[str, str]:
        """The reference proxies that run: {label: url}, measured beside the gateway."""
        return {label: p.url for label, p in (("relay", self.relay), ("haproxy", self.haproxy)) if p}

    def watch(self, gateway: GatewayProcess | None = None, upstream_pids: list[int] | None = None) -> dict:
        gateway = gateway or self.gateway
        watch = {"gateway": [gateway.proc.pid], "faktory": upstream_pids or self.faktory_pids}
        for label, process in (("relay", self.relay), ("haproxy", self.haproxy)):
            if process is not None:
                watch[label] = [process.proc.pid]
        return watch

    def flush(self) -> None:
        with RawClient.connect(self.faktory.url) as client:
            assert client.call("FLUSH") == b"+OK\r\n"

    def fill(self, queue: str, jobs: int, payload: int) -> None:
        pad = "x" * payload
        with RawClient.connect(self.faktory.url) as client:
            for start in range(0, jobs, 1000):
                batch = [
                    {"jid": f"fill-{n}", "jobtype": "bench", "queue": queue, "args": [n, pad]}
                    for n in range(start, min(jobs, start + 1000))
                ]
                reply = client.call("PUSHB " + json.dumps(batch, separators=(",", ":")))
                if reply.startswith(b"-"):
                    raise RuntimeError(f"PUSHB failed: {reply!r}")

    # --------------------------------------------------------------------------------------------
    def throughput(
        self,
        name: str,
        mode: Mode,
        conns: int,
        targets: dict[str, str],
        watch: dict,
        prepare=None,
        redis_url: str | None = None,
        extra: dict | None = None,
        payload: int | None = None,
    ) -> dict:
        """ABBA rounds over `targets` ({label: url}); totals per label."""
        payload = self.args.payload if payload is None else payload
        args = self.args
        labels = list(targets)
        per: dict[str, dict] = {
            label: {"rounds": [], "lat": array("d"), "commands": 0, "jobs": 0, "wall_s": 0.0, "errors": 0,
                    "first_error": None, "dry_fetches": 0, "cpu": Counter(), "loadgen_cpu_s": 0.0,
                    "machine_busy": [], "redis_calls": Counter()}
            for label in labels
        }  # fmt: skip
        for r in range(args.rounds):
            for label in abba(labels, r):
                if prepare:
                    prepare()
                lat_file = self.tmp / f"{name}-{label}-{r}.lat"
                spec = LoadSpec(
                    mode, url=targets[label], conns=conns, warmup=args.warmup, duration=args.duration,
                    payload=payload, watch=watch, lat_file=str(lat_file),
                    wid=f"bench-{mode}" if mode == Mode.FETCHACK else None,
                    watch_redis=redis_url if label != "direct" else None, **(extra or {}),
                )  # fmt: skip
                out = load.run(spec)
                if mode == Mode.FETCHACK:  # the next windows' queues are sized by the fastest one seen
                    self.fill_rate = max(self.fill_rate, out["ops_per_s"])
                acc = per[label]
                acc["rounds"].append({k: out[k] for k in ("ops_per_s", "commands", "wall_s", "errors")})
                acc["commands"] += out["commands"]
                acc["jobs"] += out["jobs"]
                acc["wall_s"] += out["wall_s"]
                acc["errors"] += out["errors"]
                acc["dry_fetches"] += out["dry_fetches"]
                acc["first_error"] = acc["first_error"] or out["first_error"]
                acc["cpu"].update(out["proc_cpu_s"])
                acc["loadgen_cpu_s"] += out["loadgen_cpu_s"]
                acc["machine_busy"].append(out["machine_busy_cores"])
                acc["redis_calls"].update(out.get("redis_calls") or {})
                take_latencies(lat_file, acc["lat"])
                log(f"  {name} {label:8} round {r + 1}: {out['ops_per_s']:9.0f} ops/s"
                    f"{'  errors ' + str(out['errors']) if out['errors'] else ''}")  # fmt: skip
        result = {"scenario": name, "mode": mode, "conns": conns, "payload": payload}
        for label in labels:
            acc = per[label]
            wall = acc["wall_s"]
            cmds = max(acc["commands"], 1)
            proxy = label if label in PROXIES else "gateway"  # the process in the path
            result[label] = {
                "ops_per_s": acc["jobs"] / wall,
                "commands_per_s": acc["commands"] / wall,
                "commands": acc["commands"],
                "rounds_ops_per_s": [round(x["ops_per_s"]) for x in acc["rounds"]],
                "latency": percentiles(acc["lat"]),
                "errors": acc["errors"],
                "first_error": acc["first_error"],
                "dry_fetches": acc["dry_fetches"],
                "gateway_cpu_us_per_cmd": acc["cpu"][proxy] / cmds * 1e6,
                "gateway_cores": acc["cpu"][proxy] / wall,
                "faktory_cpu_us_per_cmd": acc["cpu"]["faktory"] / cmds * 1e6,
                "faktory_cores": acc["cpu"]["faktory"] / wall,
                "loadgen_cpu_us_per_cmd": acc["loadgen_cpu_s"] / cmds * 1e6,
                "loadgen_cores": acc["loadgen_cpu_s"] / wall,
                "machine_busy_cores": sum(acc["machine_busy"]) / len(acc["machine_busy"]),
            }
            if redis_url and label != "direct":
                calls = dict(acc["redis_calls"])
                result[label]["redis_calls"] = calls
                result[label]["redis_calls_per_cmd"] = sum(calls.values()) / cmds
                result[label]["redis_calls_per_cmd_by_command"] = {
                    k: round(v / cmds, 3) for k, v in calls.items()
                }
                result[label]["ledger_redis_cpu_us_per_cmd"] = acc["cpu"]["ledger"] / cmds * 1e6
                result[label]["ledger_redis_cores"] = acc["cpu"]["ledger"] / wall
        return result

    # --------------------------------------------------------------------------------------------
    def run_push(self, conns: int) -> dict:
        name = f"push{conns}"
        log(f"{name}: PUSH, {conns} producer(s), one command in flight each")
        targets = {"direct": self.faktory.url, "gateway": self.gateway.url, **self.references()}
        return self.throughput(name, Mode.PUSH, conns, targets, self.watch(), prepare=self.flush)

    def run_push_pinned(self, conns: int) -> dict:
        """PUSH with the gateway alone on CPU 1 and everything else on CPU 0, as if it had its own core."""
        name = f"push{conns}-pinned"
        cpus = os.sched_getaffinity(0)
        if len(cpus) < 2:
            return {"scenario": name, "skipped": "needs 2 CPUs"}
        first, second = sorted(cpus)[:2]
        log(f"{name}: PUSH, {conns} producers; Faktory, its Redis and the load generator on CPU {first}, "
            f"the gateway alone on CPU {second}")  # fmt: skip
        others = self.faktory_pids
        try:
            set_affinity(others, {first})
            set_affinity([self.gateway.proc.pid], {second})
            targets = {"direct": self.faktory.url, "gateway": self.gateway.url}
            return self.throughput(name, Mode.PUSH, conns, targets, self.watch(), prepare=self.flush,
                                   extra={"cpus": [first]})  # fmt: skip
        finally:
            set_affinity([*others, self.gateway.proc.pid], cpus)

    def run_fetch(self, conns: int, payload: int | None = None, suffix: str = "") -> dict:
        name = f"fetch{conns}{suffix}"
        payload = self.args.payload if payload is None else payload
        log(f"{name}: FETCH+ACK, {conns} workers (one job = 2 commands), {payload} bytes of padding per job")
        args = self.args

        def prepare() -> None:
            self.flush()
            jobs = int(max(20000, self.fill_rate * (args.duration + args.warmup) * 2))
            self.fill("bench", jobs, payload)

        targets = {"direct": self.faktory.url, "gateway": self.gateway.url, **self.references()}
        # Size the queue from a quick direct probe so it cannot run dry.
        self.flush()
        self.fill("bench", 20000, payload)
        out = load.run(LoadSpec(Mode.FETCHACK, url=self.faktory.url, conns=conns, warmup=0.5, duration=1.0,
                                payload=payload, wid="bench-probe"))  # fmt: skip
        self.fill_rate = max(out["ops_per_s"], 1000.0)
        return self.throughput(
            name, Mode.FETCHACK, conns, targets, self.watch(), prepare=prepare, payload=payload
        )

    def run_latency(self, command: str) -> dict:
        name = f"lat-{command}"
        log(f"{name}: {command.upper()} latency, one connection per target, serial, alternating blocks")
        args = self.args
        self.flush()
        targets = {"direct": self.faktory.url, "gateway": self.gateway.url, **self.references()}
        # The targets share the window, so each gets a share of it: give it that many times the time.
        out = load.run(LoadSpec(Mode.LATENCY, command=command, targets=targets, warmup=args.warmup,
                                duration=args.duration * len(targets), payload=args.payload, block=100,
                                watch=self.watch()))  # fmt: skip
        result = {"scenario": name, "mode": "latency", "conns": 1}
        wall = out["wall_s"]
        total = sum(out["commands"].values())
        for label in targets:
            lat = out["latency"][label]
            result[label] = {
                "ops_per_s": 1e6 / lat["mean_us"] if lat else 0.0,
                "commands": out["commands"][label],
                "latency": lat,
                "errors": out["errors"][label],
                "loadgen_cores": out["loadgen_cpu_s"] / wall,
                "machine_busy_cores": out["machine_busy_cores"],
                "faktory_cpu_us_per_cmd": out["proc_cpu_s"]["faktory"] / max(total, 1) * 1e6,
            }
        for label in targets:
            if label != "direct":
                proxy_cpu = out["proc_cpu_s"][label]
                result[label]["gateway_cpu_us_per_cmd"] = proxy_cpu / max(out["commands"][label], 1) * 1e6
                result[label]["gateway_cores"] = proxy_cpu / wall
        d, g = result["direct"]["latency"], result["gateway"]["latency"]
        result["added_us"] = {q: g[q] - d[q] for q in ("p50_us", "p90_us", "p99_us", "p999_us", "mean_us")}
        log(
            f"  {name}: "
            + "; ".join(
                f"{label} p50 {result[label]['latency']['p50_us']:.0f} µs "
                f"p99 {result[label]['latency']['p99_us']:.0f} µs"
                for label in targets
            )
        )
        return result

    def run_idle(self) -> dict:
        n = self.args.idle_conns
        log(f"idle: gateway RSS before/after {n} idle connections that completed HELLO (fresh gateway)")
        gateway = GatewayProcess(self.faktory.url, *self.args.gateway_flag).start()
        try:
            pid = gateway.proc.pid
            fpid = self.faktory_pids[0]
            # Warm up: the first connections allocate the lazily created parts (metrics children, ...).
            self.idle_round(gateway, 50)
            time.sleep(0.3)
            before = rss_kib(pid)
            faktory_before = rss_kib(fpid)
            held, elapsed = self.idle_round(gateway, n, hold=True)
            after = rss_kib(pid)
            faktory_after = rss_kib(fpid)
            _, metrics = gateway.http("/metrics")
            active = re.search(r"^faktory_gateway_connections_active (\S+)", metrics, re.MULTILINE)
            held.stdin.write("close\n")
            held.stdin.flush()
            held.wait(30)
            time.sleep(0.5)
            after_close = rss_kib(pid)
        finally:
            gateway.stop()
        per_conn = (after - before) / n
        log(f"  idle: {before} KiB -> {after} KiB with {n} connections: {per_conn:.1f} KiB each; "
            f"{after_close} KiB after closing them")  # fmt: skip
        return {
            "scenario": "idle", "conns": n, "rss_before_kib": before, "rss_after_kib": after,
            "rss_after_close_kib": after_close, "kib_per_conn": per_conn, "open_seconds": elapsed,
            "gateway_connections_active": float(active.group(1)) if active else None,
            "faktory_kib_per_conn": (faktory_after - faktory_before) / n,
        }  # fmt: skip

    def idle_round(self, gateway: GatewayProcess, n: int, hold: bool = False):
        proc = load.start(LoadSpec(Mode.IDLE, url=gateway.url, conns=n, wid="bench-idle"), stdin=True)
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            proc.kill()
            raise RuntimeError(f"idle loadgen: {line!r} {proc.stdout.read()}")
        _, count, elapsed = line.split()
        if int(count) != n:
            raise RuntimeError(f"only {count} of {n} idle connections opened")
        time.sleep(1.0)  # let the gateway settle (dial tasks done, buffers at rest)
        if hold:
            return proc, float(elapsed)
        proc.stdin.write("close\n")
        proc.stdin.flush()
        proc.wait(30)
        return None

    def run_loop_lag(self) -> dict:
        """The gateway's event-loop lag (bench/lag.py): /liveness probed every 1 ms, idle and under push16.

        Each window is probed twice, the gateway and then a bare aiohttp server (the control: the
        same HTTP stack with nothing else on its loop), so the machine's share shows apart.
        """
        args = self.args
        log(f"loop-lag: GET /liveness every 1 ms, {args.duration:g} s per window: the gateway and a bare aiohttp "
            "server, idle and under push16 through the gateway")  # fmt: skip
        control = lag.ControlServer().start()
        try:
            out = {"idle": lag.LagSampler(self.gateway.http_port, args.duration).start().result(),
                   "idle-control": lag.LagSampler(control.port, args.duration).start().result()}  # fmt: skip
            self.flush()
            gen = load.start(LoadSpec(Mode.PUSH, url=self.gateway.url, conns=16, warmup=args.warmup,
                                      duration=2 * args.duration + 1.5, payload=args.payload,
                                      watch=self.watch()))  # fmt: skip
            try:
                time.sleep(args.warmup + 0.5)  # the generator's connections are up and its window is open
                out["push16"] = lag.LagSampler(self.gateway.http_port, args.duration).start().result()
                out["push16-control"] = lag.LagSampler(control.port, args.duration).start().result()
            finally:
                pushed = load.finish(gen, timeout=args.warmup + 2 * args.duration + 60)
        finally:
            control.stop()
        for name, stats in out.items():
            log(f"  loop-lag {name}: {stats['probes']} probes, p50 {stats.get('p50_us', 0):.0f} µs, "
                f"p99 {stats.get('p99_us', 0):.0f} µs, max {stats.get('max_us', 0):.0f} µs")  # fmt: skip
        return {"scenario": "loop-lag", **out, "push16_ops_per_s": pushed.get("ops_per_s"),
                "push16_errors": pushed.get("errors")}  # fmt: skip

    # --------------------------------------------------------------------------------------------
    def run_batch(self) -> dict:
        """Issue 3: batch PUSHes through the gateway with a Redis ledger, in front of the Ent stand-in."""
        log("batch: PUSH into open batches, 16 producers, direct to the Ent stand-in vs gateway --redis")
        redis = standin = gateway = None
        try:
            redis = RedisServer().start()
            standin = StandinProcess(self.faktory.url).start()
            standin_pids = [standin.proc.pid, *self.faktory_pids]
            gateway = GatewayProcess(standin.url, "--redis", redis.url, *self.args.gateway_flag).start()
            targets = {"direct": standin.url, "gateway": gateway.url}
            watch = {**self.watch(gateway, standin_pids), "ledger": [redis.proc.pid]}
            conns = 16
            batch = self.throughput("batch16", Mode.BATCHPUSH, conns, targets, watch, prepare=self.flush,
                                    redis_url=redis.url)  # fmt: skip
            plain = self.throughput("push16-ledger", Mode.PUSH, conns, targets, watch, prepare=self.flush,
                                    redis_url=redis.url)  # fmt: skip
            if self.args.profile == "batch":
                self.profile_result = self.profile("batch", gateway)
        finally:
            stop_all(gateway, standin, redis)
        return {"scenario": "batch", "batch": batch, "plain": plain}

    # --------------------------------------------------------------------------------------------
    def profile(self, scenario: str, gateway: GatewayProcess | None = None, label: str = "gateway") -> dict:
        """Profile the gateway (or `label`'s process) under the scenario's load (not a measurement).

        py-spy gives the Python stacks; `perf` (when present) then splits the process's CPU time
        between the kernel (socket calls), the interpreter and uvloop. The process's CPU per command
        over the same load turns the percentages into microseconds per command.
        """
        py_spy = profiling.py_spy()
        if not py_spy:
            return {"process": label, "skipped": "py-spy not installed (pip install py-spy)"}
        gateway = gateway or self.gateway
        modes = {"push1": (Mode.PUSH, 1), "push16": (Mode.PUSH, 16), "fetch16": (Mode.FETCHACK, 16),
                 "batch": (Mode.BATCHPUSH, 16)}  # fmt: skip
        mode, conns = modes.get(scenario, (Mode.PUSH, 16))
        RESULTS.mkdir(exist_ok=True)
        raw = RESULTS / f"profile-{scenario}{'' if label == 'gateway' else '-' + label}.txt"
        seconds = max(1, round(self.args.profile_seconds))
        perf_seconds = max(2, seconds // 2)
        perf = shutil.which("perf")
        self.flush()
        if mode == Mode.FETCHACK:
            self.fill("bench", int(self.fill_rate * (seconds + perf_seconds + 3) * 1.5), self.args.payload)
        log(f"profile: py-spy on the {label} under {scenario} for {seconds} s" + (
            f", then perf for {perf_seconds} s" if perf else ""))  # fmt: skip
        gen = load.start(LoadSpec(mode, url=gateway.url, conns=conns, warmup=0.5,
                                  duration=seconds + (perf_seconds + 1 if perf else 0) + 1.5,
                                  payload=self.args.payload, wid="bench-prof" if mode == Mode.FETCHACK else None,
                                  watch={label: [gateway.proc.pid]}))  # fmt: skip
        time.sleep(0.8)
        pid = gateway.proc.pid
        spy_errors = profiling.record_stacks(py_spy, pid, seconds, raw)
        split = profiling.perf_split(perf, pid, perf_seconds, self.tmp / "perf.data") if perf else None
        loaded = load.finish(gen, timeout=90)
        cpu_us = loaded["proc_cpu_s"][label] / loaded["commands"] * 1e6 if loaded.get("commands") else None
        if not raw.exists():
            return {"skipped": f"py-spy produced nothing: {spy_errors.strip()[-500:]}"}
        frames = profiling.top_frames(raw)
        return {"scenario": scenario, "process": label, "samples": frames["samples"],
                "raw": str(raw.relative_to(REPO)), "cpu_us_per_cmd": cpu_us, "top_self_pct": frames["top_self_pct"],
                "top_inclusive_pct": frames["top_inclusive_pct"], "perf": split}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Report


def compare(r: dict) -> None:
    """Add the ratios of a scenario's result: each proxy against direct, the gateway against the others."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    direct, gw = r["direct"], r["gateway"]
    r["ratio"] = ratio(gw["ops_per_s"], direct["ops_per_s"]) or 0.0
    for label in ("relay", "haproxy"):
        if label in r:
            r[f"{label}_ratio"] = ratio(r[label]["ops_per_s"], direct["ops_per_s"]) or 0.0
    if "haproxy" in r:
        h = r["haproxy"]
        r["vs_haproxy"] = ratio(gw["ops_per_s"], h["ops_per_s"])
        if gw.get("latency") and h.get("latency"):
            r["over_haproxy_us"] = {q: gw["latency"][q] - h["latency"][q] for q in ("p50_us", "p99_us")}
    if "relay" in r:
        r["cpu_vs_relay"] = ratio(gw.get("gateway_cpu_us_per_cmd"), r["relay"].get("gateway_cpu_us_per_cmd"))


def verdicts(results: list[dict]) -> list[Target]:
    """Each target of the scenarios that ran; passed None when it could not be measured."""
    out = []
    by = {r["scenario"]: r for r in results}

    def against_haproxy(name: str, what: str, key: str) -> None:
        if name not in by:
            return
        ratio = by[name].get("vs_haproxy")
        limit = TARGETS[key]
        out.append(Target(what, f">= {limit:.2f}x HAProxy", "no HAProxy" if ratio is None else f"{ratio:.2f}x",
                    None if ratio is None else ratio >= limit))  # fmt: skip

    against_haproxy("push16", "PUSH x16 throughput", "push16_vs_haproxy")
    if "push16" in by:
        cpu = by["push16"].get("cpu_vs_relay")
        limit = TARGETS["push16_cpu_vs_relay"]
        out.append(Target("PUSH x16 CPU per command", f"<= {limit:.2f}x relay",
                    "no relay" if cpu is None else f"{cpu:.2f}x", None if cpu is None else cpu <= limit))  # fmt: skip
    for name in ("lat-push", "lat-beat"):
        if name in by:
            over = by[name].get("over_haproxy_us")
            for q, key in (("p50", "lat_p50_over_haproxy_us"), ("p99", "lat_p99_over_haproxy_us")):
                limit = TARGETS[key]
                measured = "no HAProxy" if over is None else f"{over[q + '_us']:+.0f} µs"
                out.append(Target(f"{name} {q} over HAProxy's", f"<= +{limit:.0f} µs", measured,
                            None if over is None else over[q + "_us"] <= limit))  # fmt: skip
    against_haproxy("fetch16", "FETCH+ACK x16 throughput", "fetch16_vs_haproxy")
    against_haproxy("fetch16-1k", "FETCH+ACK x16, 1 KiB jobs", "fetch16_vs_haproxy")
    if "idle" in by:
        kib = by["idle"]["kib_per_conn"]
        limit = TARGETS["idle_kib_per_conn"]
        out.append(
            Target("memory per idle connection", f"<= {limit:.0f} KiB", f"{kib:.1f} KiB", kib <= limit)
        )
    if "batch" in by:
        b = by["batch"]
        if b.get("skipped"):
            out.append(Target("batch PUSH x16 throughput", ">= 0.90x plain PUSH", "skipped", None))
        else:
            batch, plain = b["batch"]["gateway"], b["plain"]["gateway"]
            ratio = batch["ops_per_s"] / plain["ops_per_s"]
            out.append(Target("batch PUSH x16 throughput", ">= 0.90x plain PUSH", f"{ratio:.2f}x",
                        ratio >= TARGETS["batch_vs_plain"]))  # fmt: skip
            cpu = batch["gateway_cpu_us_per_cmd"] / plain["gateway_cpu_us_per_cmd"]
            out.append(Target("batch PUSH x16 CPU per command", "<= 1.30x plain PUSH", f"{cpu:.2f}x",
                        cpu <= TARGETS["batch_cpu_vs_plain"]))  # fmt: skip
            calls = batch.get("redis_calls_per_cmd")
            out.append(Target("ledger Redis calls per batch PUSH", "<= 0.05", f"{calls:.3f}",
                        calls <= TARGETS["batch_redis_calls"]))  # fmt: skip
            plain_calls = plain.get("redis_calls_per_cmd")
            out.append(
                Target("non-batch PUSH Redis calls", "0 per PUSH", f"{plain_calls:.3f}", plain_calls == 0)
            )
    return out


def added_to_direct(r: dict, label: str) -> dict | None:
    """Percentiles of `label` minus direct's, for one-connection rows only (see the README)."""
    d, t = r["direct"].get("latency"), r[label].get("latency")
    if r.get("conns") != 1 or not d or not t:
        return None
    return {q: t[q] - d[q] for q in ("p50_us", "p99_us")}


def spread(side: dict) -> str:
    rounds = side.get("rounds_ops_per_s") or []
    if len(rounds) < 2:
        return ""
    mean = sum(rounds) / len(rounds)
    return f"±{50 * (max(rounds) - min(rounds)) / mean:.0f}%" if mean else ""


def pair(values: dict | None, sign: str = "") -> str:
    return f"{values['p50_us']:{sign}.0f}/{values['p99_us']:{sign}.0f}" if values else "-"


def report(results: list[dict], meta: dict) -> str:
    lines = []
    heading(lines, "Each proxy against direct, in the same rounds (rows -relay and -haproxy: the reference proxies)",
            f"{'scenario':18} {'direct ops/s':>16} {'proxy ops/s':>16} {'ratio':>6} {'direct p50/p99 µs':>17} "
            f"{'proxy p50/p99 µs':>16} {'added p50/p99 µs':>16} {'CPU µs/cmd':>10}")  # fmt: skip
    rows = []
    for r in results:
        if r["scenario"] in ("idle", "loop-lag") or r.get("skipped"):
            continue
        for scenario in [r["batch"], r["plain"]] if r["scenario"] == "batch" else [r]:
            for label in PROXIES:
                if label in scenario:
                    rows.append({"scenario": scenario["scenario"] + ("" if label == "gateway" else f"-{label}"),
                                 "base": scenario, "proxy": label})  # fmt: skip
    for row in rows:
        r, label = row["base"], row["proxy"]
        d, g = r["direct"], r[label]
        ratio = r["ratio"] if label == "gateway" else r[f"{label}_ratio"]
        # Under 16 producers the sides run at different rates, so their latency difference is not
        # the proxy's added latency: shown for the one-connection rows only.
        added = r.get("added_us") if label == "gateway" else None
        added = added or added_to_direct(r, label)
        lines.append(
            f"{row['scenario']:18} {d['ops_per_s']:10.0f} {spread(d):>5} {g['ops_per_s']:10.0f} {spread(g):>5} "
            f"{ratio:6.2f} {pair(d.get('latency')):>17} {pair(g.get('latency')):>16} {pair(added):>16} "
            f"{fmt(g.get('gateway_cpu_us_per_cmd'), '.1f'):>10}"
        )
    for r in results:
        if r["scenario"] == "idle":
            lines.append(f"{'idle':18} {r['conns']} connections after HELLO: gateway RSS {r['rss_before_kib']} -> "
                         f"{r['rss_after_kib']} KiB = {r['kib_per_conn']:.1f} KiB per connection "
                         f"(Faktory itself: {r['faktory_kib_per_conn']:.1f} KiB)")  # fmt: skip
        if r.get("skipped"):
            lines.append(f"{r['scenario']:18} SKIPPED: {r['skipped']}")

    compared = [r for r in results if "haproxy" in r or "relay" in r]
    if compared:
        heading(lines, "The gateway against the reference proxies (same rounds; CPU: each proxy process's µs "
                "per command it carried)", f"{'scenario':18} {'gw/HAProxy':>10} {'gw-HAProxy p50/p99 µs':>22} "
                f"{'gateway':>8} {'relay':>8} {'HAProxy':>8} {'gw/relay CPU':>12}")  # fmt: skip
        for r in compared:
            over = r.get("over_haproxy_us")
            over_s = pair(over, "+") if over and r.get("conns") == 1 else "-"
            cpu = {label: (r.get(label) or {}).get("gateway_cpu_us_per_cmd") for label in PROXIES}
            lines.append(f"{r['scenario']:18} {fmt(r.get('vs_haproxy'), '.2f'):>10} {over_s:>22} "
                         f"{fmt(cpu['gateway'], '.1f'):>8} {fmt(cpu['relay'], '.1f'):>8} "
                         f"{fmt(cpu['haproxy'], '.1f'):>8} {fmt(r.get('cpu_vs_relay'), '.2f'):>12}")  # fmt: skip

    for r in results:
        if r["scenario"] == "loop-lag":
            heading(lines, "Gateway event-loop lag: GET /liveness every 1 ms from another process (send to full "
                    "response), µs", f"{'load':18} {'probes':>7} {'p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7} "
                    f"{'>1ms':>5} {'>5ms':>5} {'>20ms':>5} {'prober late max':>15}")  # fmt: skip
            for name in ("idle", "idle-control", "push16", "push16-control"):
                lag = r.get(name)
                if lag is None:
                    continue
                lines.append(f"{name:18} {lag['probes']:7d} {fmt(lag.get('p50_us')):>7} {fmt(lag.get('p99_us')):>7} "
                             f"{fmt(lag.get('p999_us')):>7} {fmt(lag.get('max_us')):>7} {lag['over_1ms']:5d} "
                             f"{lag['over_5ms']:5d} {lag['over_20ms']:5d} {lag['late_max_us']:15.0f}")  # fmt: skip
            if r.get("push16_ops_per_s"):
                lines.append(f"  (-control: a bare aiohttp server on uvloop probed the same way, in the same "
                             f"conditions; push16 through the gateway ran at {r['push16_ops_per_s']:.0f} ops/s "
                             "while probed)")  # fmt: skip

    heading(lines, f"CPU in the measurement windows (cores busy: 1.00 = one core; the machine has {meta['cpus']}); "
            "per command in µs", f"{'scenario':18} {'target':8} {'loadgen':>12} {'proxy':>12} {'faktory+redis':>14} "
            f"{'machine busy':>12} {'errors':>6}")  # fmt: skip
    for row in rows:
        r, label = row["base"], row["proxy"]
        for target in (["direct"] if label == "gateway" else []) + [label]:
            s = r[target]
            lg = f"{fmt(s.get('loadgen_cores'), '.2f')}c" + (
                f" {s['loadgen_cpu_us_per_cmd']:.0f}µs" if "loadgen_cpu_us_per_cmd" in s else ""
            )
            px = (f"{fmt(s.get('gateway_cores'), '.2f')}c {s['gateway_cpu_us_per_cmd']:.0f}µs"
                  if target != "direct" and "gateway_cores" in s else "-")  # fmt: skip
            fk = (f"{fmt(s.get('faktory_cores'), '.2f')}c " if "faktory_cores" in s else "") + (
                f"{s['faktory_cpu_us_per_cmd']:.0f}µs"
            )
            lines.append(f"{r['scenario']:18} {target:8} {lg:>12} {px:>12} {fk:>14} "
                         f"{fmt(s.get('machine_busy_cores'), '.2f'):>12} {s.get('errors', 0):>6}")  # fmt: skip
    lines.append("")
    lines.append("Targets")
    lines.extend(target.line() for target in verdicts(results))
    for r in results:
        for side in ("direct", *PROXIES):
            s = r.get(side) or {}
            if s.get("first_error"):
                lines.append(
                    f"  note: {r['scenario']} {side}: {s['errors']} errors, first: {s['first_error']}"
                )
            if s.get("dry_fetches"):
                lines.append(
                    f"  note: {r['scenario']} {side}: {s['dry_fetches']} FETCHes found the queue empty"
                )
    for row in rows:
        g = row["base"][row["proxy"]]
        if "redis_calls_per_cmd" in g:
            by = (
                ", ".join(f"{k} {v}" for k, v in sorted(g["redis_calls_per_cmd_by_command"].items()))
                or "none"
            )
            lines.append(f"  ledger Redis, {row['scenario']} through the gateway: {g['redis_calls_per_cmd']:.2f} "
                         f"calls per command ({by}; commands run inside Lua scripts count too), "
                         f"Redis CPU {g['ledger_redis_cpu_us_per_cmd']:.0f} µs per command")  # fmt: skip
    for note in meta.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


# The flags with a value, in --help's order: (flag, type, default, help).
FLAGS = (
    ("--duration", float, 3.0, "seconds per measurement window (default 3)"),
    ("--warmup", float, 1.0, "seconds of load before each window (default 1)"),
    ("--rounds", int, 2, "windows per target per throughput scenario, ABBA order (default 2)"),
    (
        "--scenarios",
        str,
        ",".join(SCENARIOS),
        f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    ),
    ("--payload", int, 100, "bytes of padding in each job's args (default 100)"),
    ("--idle-conns", int, 1000, "idle connections for the memory scenario"),
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, kind, default, text in FLAGS:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument(
        "--gateway-flag",
        action="append",
        default=[],
        help="extra flag for the gateway (repeatable), e.g. --gateway-flag=--log-level=warning",
    )
    parser.add_argument(
        "--no-relay",
        action="store_true",
        help="skip the bare uvloop relay (bench/relay.py) measured beside the gateway",
    )
    parser.add_argument("--no-haproxy", action="store_true", help="skip HAProxy (mode tcp, one thread) measured "
                        "beside the gateway; the targets stated against it are then n/a")  # fmt: skip
    parser.add_argument("--profile", default="", help="after measuring, py-spy the gateway (and the relay) under "
                        "this scenario (push1, push16, fetch16, batch) and print where their time goes")  # fmt: skip
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument("--json", default=str(RESULTS / "latest.json"), help="where to write the results")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {','.join(SCENARIOS)}")

    raise_nofile(args.idle_conns * 2 + 1000)  # the gateways inherit it

    bench = Bench(args)
    started = time.monotonic()
    load_before = os.getloadavg()
    profile = None
    try:
        bench.start()
        # A short warm-up of both paths before anything is measured.
        for url in (bench.faktory.url, bench.gateway.url):
            load.run(LoadSpec(Mode.PUSH, url=url, conns=4, warmup=0, duration=0.7, payload=10))
        for scenario in chosen:
            if scenario == "push1":
                result = bench.run_push(1)
            elif scenario == "push16":
                result = bench.run_push(16)
            elif scenario == "push16-pinned":
                result = bench.run_push_pinned(16)
            elif scenario == "fetch16":
                result = bench.run_fetch(16)
            elif scenario == "fetch16-1k":
                result = bench.run_fetch(16, payload=FETCH_1K_PAYLOAD, suffix="-1k")
            elif scenario in ("lat-push", "lat-beat"):
                result = bench.run_latency(scenario.split("-")[1])
            elif scenario == "idle":
                result = bench.run_idle()
            elif scenario == "loop-lag":
                result = bench.run_loop_lag()
            else:
                result = bench.run_batch()
            for r in [result, result.get("batch"), result.get("plain")]:
                if r and "direct" in r and "gateway" in r:
                    compare(r)
            bench.results.append(result)
        if args.profile == "batch":
            profile = bench.profile_result or {"skipped": "the batch scenario did not run"}
        elif args.profile:
            profile = bench.profile(args.profile)
            if bench.relay is not None:  # the same load through the bare relay, for comparison
                profile["relay"] = bench.profile(args.profile, bench.relay, "relay")
    finally:
        bench.stop()
    load_after = os.getloadavg()
    # Other work on the machine takes the same cores: say how busy it was (1-minute load averages).
    bench.notes.append(f"load average {load_before[0]:.2f} before the run, {load_after[0]:.2f} after "
                       f"({os.cpu_count()} CPUs); this run's own processes count too")  # fmt: skip
    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.monotonic() - started, 1),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items()},
        "notes": bench.notes,
    }
    text = report(bench.results, meta)
    print(text)
    if profile:
        for one in (profile, profile.get("relay")):
            if one:
                print()
                print(profiling.text(one, args.profile))
    targets = [target.as_json() for target in verdicts(bench.results)]
    out = write_json(args.json, {"meta": meta, "results": bench.results, "targets": targets, "profile": profile,
                                 "table": text})  # fmt: skip
    print(f"\nwritten to {out} in {meta['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
