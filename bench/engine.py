"""Benchmark: the batch engine (`batches: gateway`) against plain traffic through the same gateway,
in front of the real Faktory OSS server, with a Redis ledger, in one run.

    python bench/engine.py                        # everything, about 4 minutes
    python bench/engine.py --rounds 2 --duration 3 --scale 20000 --scenarios push,scale

- push: PUSH into open batches (BATCH NEW once per connection) against plain PUSH, 16 connections,
  ABBA rounds; jobs/s and the gateway's CPU per command.
- ack: FETCH+ACK of committed batches' jobs against plain jobs, 16 worker connections, ABBA rounds
  (each round's queue filled before the window: batch jobs through the gateway in batches of 1,000,
  plain jobs straight to the server).
- life: ledger round trips per batch job over its whole life (BATCH NEW, every push, COMMIT, every
  FETCH and ACK, both callbacks run and ACKed), from the gateway's own `store_calls` counter; once
  with one PUSH per job (the Go client's `Batch.Push`), once with PUSHB.
- latency: last ACK to callback enqueued: one-job batches, serially; from the moment the worker
  sends the last member's ACK to the moment a FETCH already waiting on the callbacks' queue
  returns the callback (so the FETCH's own round trip is not in it); idle, and again under the
  push scenario's batch load.
- scale: one batch of 100,000 jobs (Enterprise's own claim) pushed with PUSHB, committed, worked by
  16 connections, its callbacks checked, the ledger's growth measured.

Targets (issue 20): batch PUSH and batch ACK >= 0.7x plain; <= 2 ledger round trips per batch job
over its life; callback latency p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.lib, tests.support

from bench.lib import load
from bench.lib.load import LoadSpec, Mode, abba
from bench.lib.process import children_of, stop_all
from bench.lib.report import RESULTS, Target, fmt, heading, log, percentiles, write_json
from bench.lib.resp import redis_info
from tests.support.client import RawClient, uid
from tests.support.processes import FaktoryServer, GatewayProcess, RedisServer

QUEUE = "bench"  # the load generator's queue
CALLBACKS = "bench-cb"
BATCH_NEW = json.dumps(
    {"description": "bench", "complete": {"jobtype": "cb", "args": [], "queue": CALLBACKS}}
)
SCENARIOS = ("push", "ack", "life", "latency", "scale")
TARGETS = {"push_vs_plain": 0.7, "ack_vs_plain": 0.7, "ledger_calls_per_job": 2.0, "callback_p99_ms": 50.0}
STORE_CALL = re.compile(r'^faktory_gateway_store_calls_total\{operation="([^"]+)"\} ([0-9.e+]+)$', re.M)


def store_calls(gateway: GatewayProcess) -> Counter:
    """The gateway's ledger round trips so far, by operation (its own counter: one per call)."""
    code, text = gateway.http("/metrics")
    assert code == 200, text
    return Counter({op: int(float(n)) for op, n in STORE_CALL.findall(text)})


def batch_new(client: RawClient, spec: str = BATCH_NEW) -> str:
    reply = client.call("BATCH NEW " + spec)
    if not reply.startswith(b"$"):
        raise RuntimeError(f"BATCH NEW: {reply!r}")
    return reply.split(b"\r\n")[1].decode()


def pushb(client: RawClient, jobs: list[dict]) -> None:
    reply = client.call("PUSHB " + json.dumps(jobs, separators=(",", ":")))
    if reply not in (b"+OK\r\n", b"$2\r\n{}\r\n"):  # Faktory 1.9.4 answers an empty error map
        raise RuntimeError(f"PUSHB: {reply[:300]!r}")


def bench_job(n: int, bid: str | None = None, pad: str = "x" * 100, tag: str = "") -> dict:
    job = {"jid": f"j{tag}-{n:08d}", "jobtype": "bench", "queue": QUEUE, "args": [n, pad]}
    if bid:
        job["custom"] = {"bid": bid}
    return job


def work_all(client: RawClient, queue: str, expect: int) -> int:
    """FETCH and ACK until `expect` jobs ran or the queue stays empty; returns how many ran."""
    ran = 0
    while ran < expect:
        fetched = client.value(f"FETCH {queue}")
        if fetched is None:
            break
        jid = json.loads(fetched)["jid"]
        assert client.call('ACK {"jid":"%s"}' % jid) == b"+OK\r\n"
        ran += 1
    return ran


def wait_for(client: RawClient, queue: str, into: dict) -> None:
    """FETCH `queue` (blocking on the server up to 2 s); the job and the moment it arrived."""
    into.update(job=client.value(f"FETCH {queue}"), t=time.perf_counter())


class EngineBench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.faktory = FaktoryServer().start()
        self.redis = RedisServer().start()
        self.gateway = GatewayProcess(
            self.faktory.url, "--batches", "gateway", "--redis", self.redis.url, "--log-level", "warning"
        ).start()
        faktory_pids = [self.faktory.proc.pid, *children_of(self.faktory.proc.pid)]
        self.watch = {
            "gateway": [self.gateway.proc.pid],
            "faktory": faktory_pids,
            "ledger": [self.redis.proc.pid],
        }
        self.fill_rate = 4000.0  # jobs/s a worker window may take; raised to the fastest seen

    def close(self) -> None:
        stop_all(self.gateway, self.redis, self.faktory)
        self.faktory.cleanup()

    def flush(self) -> None:
        with RawClient.connect(self.faktory.url) as client:
            assert client.call("FLUSH") == b"+OK\r\n"

    def spec(self, mode: Mode, **extra) -> LoadSpec:
        a = self.args
        return LoadSpec(mode, url=self.gateway.url, conns=a.conns, warmup=a.warmup, duration=a.duration,
                        queue=QUEUE, watch=self.watch, **extra)  # fmt: skip

    def rounds(self, name: str, modes: dict[str, Mode], prepare) -> dict:
        """ABBA rounds of the labelled modes through the gateway; totals per label."""
        per = {label: Counter() for label in modes}
        for r in range(self.args.rounds):
            for label in abba(list(modes), r):
                self.flush()
                prepare(label)
                mode = modes[label]
                out = load.run(self.spec(mode, wid=f"bench-{uid()}" if mode == Mode.FETCHACK else None,
                                         batch_new="BATCH NEW " + BATCH_NEW))  # fmt: skip
                if out["errors"]:
                    raise RuntimeError(f"{name} {label}: {out['errors']} errors, first {out['first_error']}")
                if mode == Mode.FETCHACK:
                    self.fill_rate = max(self.fill_rate, out["ops_per_s"])
                acc = per[label]
                acc.update(jobs=out["jobs"], commands=out["commands"], wall_s=out["wall_s"],
                           gateway_cpu_s=out["proc_cpu_s"]["gateway"], ledger_cpu_s=out["proc_cpu_s"]["ledger"])  # fmt: skip
                log(f"  {name} {label:6} round {r + 1}: {out['ops_per_s']:8.0f} jobs/s")
        return {
            label: {
                "jobs_per_s": acc["jobs"] / acc["wall_s"],
                "gateway_cpu_us_per_cmd": acc["gateway_cpu_s"] / max(acc["commands"], 1) * 1e6,
                "ledger_cpu_us_per_job": acc["ledger_cpu_s"] / max(acc["jobs"], 1) * 1e6,
            }
            for label, acc in per.items()
        }

    # --------------------------------------------------------------------------------------------
    def push(self) -> dict:
        log(f"push: PUSH into open batches vs plain PUSH, {self.args.conns} connections")
        return self.rounds("push", {"plain": Mode.PUSH, "batch": Mode.BATCHPUSH}, prepare=lambda label: None)

    def ack(self) -> dict:
        log(f"ack: FETCH+ACK of batch jobs vs plain jobs, {self.args.conns} workers")

        def fill(label: str) -> None:
            jobs = int(self.fill_rate * (self.args.warmup + self.args.duration) * 1.5)
            tag = uid()
            url = self.gateway.url if label == "batch" else self.faktory.url
            with RawClient.connect(url) as client:
                for start in range(0, jobs, 1000):
                    bid = batch_new(client) if label == "batch" else None
                    pushb(client, [bench_job(n, bid, tag=tag) for n in range(start, min(jobs, start + 1000))])
                    if bid:
                        assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"

        return self.rounds("ack", {"plain": Mode.FETCHACK, "batch": Mode.FETCHACK}, prepare=fill)

    # --------------------------------------------------------------------------------------------
    def life(self) -> dict:
        """Every ledger round trip of `batches` batches of `jobs` jobs, from BATCH NEW to the
        success callback's ACK, per job."""
        batches, jobs = self.args.life_batches, self.args.life_jobs
        out = {}
        for how in ("push", "pushb"):
            log(f"life: {batches} batches of {jobs} jobs, {how}, worked to their success callbacks")
            self.flush()
            spec = json.dumps({"description": "life", "complete": {"jobtype": "cb", "args": [], "queue": CALLBACKS},
                               "success": {"jobtype": "cb", "args": [], "queue": CALLBACKS}})  # fmt: skip
            before = store_calls(self.gateway)
            tag = uid()
            with (
                RawClient.connect(self.gateway.url) as producer,
                RawClient.connect(self.gateway.url, wid="life-" + tag) as worker,
            ):
                for b in range(batches):
                    bid = batch_new(producer, spec)
                    members = [bench_job(b * jobs + n, bid, tag=tag) for n in range(jobs)]
                    if how == "pushb":
                        pushb(producer, members)
                    else:
                        for member in members:
                            assert (
                                producer.call("PUSH " + json.dumps(member, separators=(",", ":")))
                                == b"+OK\r\n"
                            )
                    assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
                ran = work_all(worker, QUEUE, batches * jobs)
                callbacks = work_all(worker, CALLBACKS, batches) + work_all(worker, CALLBACKS, batches)
            calls = store_calls(self.gateway) - before
            if ran != batches * jobs or callbacks != 2 * batches:
                raise RuntimeError(f"life {how}: {ran} jobs and {callbacks} callbacks ran")
            total = sum(calls.values())
            out[how] = {"jobs": ran, "calls": dict(calls), "calls_per_job": total / ran}
            log(
                f"  {how}: {total} ledger round trips for {ran} jobs: {total / ran:.3f} per job {dict(calls)}"
            )
        return out

    # --------------------------------------------------------------------------------------------
    def latency(self) -> dict:
        out = {"idle": self.callback_latency(self.args.latency)}
        log(f"latency: again under batch PUSH load ({self.args.conns} connections)")
        spec = self.spec(Mode.BATCHPUSH, batch_new="BATCH NEW " + BATCH_NEW)
        spec.warmup, spec.duration = 0.5, 600.0  # stopped when the samples are in
        gen = load.start(spec)
        time.sleep(1.5)
        try:
            out["under_load"] = self.callback_latency(self.args.latency)
        finally:
            gen.kill()
            gen.wait()
        return out

    def callback_latency(self, n: int) -> dict | None:
        log(f"latency: {n} one-job batches, last ACK sent -> callback fetched")
        queue, callbacks = "lat-" + uid(), "lat-cb-" + uid()
        spec = json.dumps({"complete": {"jobtype": "cb", "args": [], "queue": callbacks}})
        samples = []
        with (
            RawClient.connect(self.gateway.url) as producer,
            RawClient.connect(self.gateway.url, wid="lat-" + uid()) as worker,
            RawClient.connect(self.gateway.url, wid="latcb-" + uid()) as waiter,
        ):
            for i in range(n):
                bid = batch_new(producer, spec)
                member = bench_job(i, bid, tag=queue)
                member["queue"] = queue
                assert producer.call("PUSH " + json.dumps(member)) == b"+OK\r\n"
                assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
                fetched = json.loads(worker.value(f"FETCH {queue}"))
                got: dict = {}
                # The callback's FETCH is on the server, waiting, before the ACK leaves.
                fetcher = threading.Thread(target=wait_for, args=(waiter, callbacks, got))
                fetcher.start()
                time.sleep(0.002)
                sent = time.perf_counter()
                assert worker.call('ACK {"jid":"%s"}' % fetched["jid"]) == b"+OK\r\n"
                fetcher.join(10)
                if not got.get("job"):
                    raise RuntimeError(f"no callback for {bid}")
                samples.append(got["t"] - sent)
                assert waiter.call('ACK {"jid":"%s"}' % json.loads(got["job"])["jid"]) == b"+OK\r\n"
        stats = percentiles(samples)
        log(
            f"  p50 {stats['p50_us'] / 1000:.2f} ms, p99 {stats['p99_us'] / 1000:.2f} ms, max {stats['max_us'] / 1000:.2f} ms"
        )
        return stats

    # --------------------------------------------------------------------------------------------
    def scale(self) -> dict:
        jobs = self.args.scale
        log(
            f"scale: one batch of {jobs:,} jobs (PUSHB of 1,000), committed, worked by {self.args.conns} workers"
        )
        self.flush()
        memory_before = int(redis_info(self.redis.url, "memory")["used_memory"])
        tag = uid()
        started = time.monotonic()
        with RawClient.connect(self.gateway.url) as producer:
            bid = batch_new(producer)
            for start in range(0, jobs, 1000):
                pushb(producer, [bench_job(n, bid, tag=tag) for n in range(start, min(jobs, start + 1000))])
            assert producer.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"
            pushed = time.monotonic() - started
            status = producer.json(f"BATCH STATUS {bid}")
            memory_joined = int(redis_info(self.redis.url, "memory")["used_memory"]) - memory_before
            assert status["total"] == status["pending"] == jobs, status
            started, ran, busy = time.monotonic(), 0, 0.0
            while status["pending"] and time.monotonic() - started < 600:
                spec = self.spec(Mode.FETCHACK, wid="scale-" + uid())
                spec.warmup, spec.duration = 0.0, 3.0
                out = load.run(spec)
                ran, busy = ran + out["jobs"], busy + out["wall_s"]
                status = producer.json(f"BATCH STATUS {bid}")
            worked = time.monotonic() - started
        with RawClient.connect(self.gateway.url, wid="scale-" + uid()) as worker:
            callbacks = work_all(worker, CALLBACKS, 2)
            final = worker.json(f"BATCH STATUS {bid}")
        result = {"jobs": jobs, "push_s": pushed, "work_s": worked, "work_jobs_per_s": ran / busy if busy else None,
                  "ledger_bytes_per_job": memory_joined / jobs, "callbacks": callbacks, "final": final}  # fmt: skip
        log(f"  pushed in {pushed:.1f} s, worked in {worked:.1f} s, {memory_joined / jobs:.0f} B/job of ledger "
            f"growth; {callbacks} callback; final {final}")  # fmt: skip
        return result


def report(r: dict) -> tuple[list[str], list[Target]]:
    lines: list[str] = []
    if "push" in r or "ack" in r:
        heading(lines, "batches: gateway, same gateway, same run", f"{'scenario':10} {'plain jobs/s':>13} {'batch jobs/s':>13} {'ratio':>6} {'gateway CPU µs/cmd plain':>25} {'batch':>7} {'ledger CPU µs/job':>18}")  # fmt: skip
    targets = []
    for name in ("push", "ack"):
        if name not in r:
            continue
        plain, batch = r[name]["plain"], r[name]["batch"]
        ratio = batch["jobs_per_s"] / plain["jobs_per_s"]
        lines.append(f"{name:10} {plain['jobs_per_s']:13.0f} {batch['jobs_per_s']:13.0f} {ratio:6.2f} "
                     f"{plain['gateway_cpu_us_per_cmd']:25.1f} {batch['gateway_cpu_us_per_cmd']:7.1f} "
                     f"{batch['ledger_cpu_us_per_job']:18.1f}")  # fmt: skip
        targets.append(Target(f"batch {name.upper()} throughput", ">= 0.70x plain", f"{ratio:.2f}x",
                              ratio >= TARGETS[f"{name}_vs_plain"]))  # fmt: skip
    if "life" in r:
        heading(lines, "ledger round trips per batch job, NEW to the success callback's ACK", f"{'pushed by':10} {'per job':>8}  by operation")  # fmt: skip
        for how, life in r["life"].items():
            lines.append(f"{how:10} {life['calls_per_job']:8.3f}  {life['calls']}")
            targets.append(Target(f"ledger round trips/job ({how})", "<= 2", f"{life['calls_per_job']:.3f}",
                                  life["calls_per_job"] <= TARGETS["ledger_calls_per_job"]))  # fmt: skip
    if "latency" in r:
        heading(lines, "callback latency: last ACK sent -> callback fetched (ms)", f"{'':12} {'n':>5} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}")  # fmt: skip
        for label, s in r["latency"].items():
            lines.append(f"{label:12} {s['n']:5} " + " ".join(f"{s[k] / 1000:7.2f}" for k in ("p50_us", "p90_us", "p99_us", "max_us")))  # fmt: skip
            targets.append(Target(f"callback latency p99 ({label})", "<= 50 ms", f"{s['p99_us'] / 1000:.2f} ms",
                                  s["p99_us"] / 1000 <= TARGETS["callback_p99_ms"]))  # fmt: skip
    if "scale" in r:
        s = r["scale"]
        lines += ["", "scale: one batch"]
        lines.append(f"{s['jobs']:,} jobs: pushed+committed {s['push_s']:.1f} s, worked {s['work_s']:.1f} s "
                     f"({fmt(s['work_jobs_per_s'])} jobs/s in the windows), ledger growth {fmt(s['ledger_bytes_per_job'], '.0f')} B/job, "
                     f"callbacks run {s['callbacks']}, final {s['final']['complete_st']}/{s['final']['success_st']} "
                     f"pending {s['final']['pending']}")  # fmt: skip
    return lines, targets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--latency", type=int, default=300, help="one-job batches per latency sample set")
    parser.add_argument("--life-batches", type=int, default=10)
    parser.add_argument("--life-jobs", type=int, default=500)
    parser.add_argument("--scale", type=int, default=100_000, help="jobs in the scale batch (0: skip)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="a subset of " + ",".join(SCENARIOS))
    parser.add_argument("--json", default=str(RESULTS / "engine.json"))
    args = parser.parse_args()
    bench = EngineBench(args)
    results: dict = {"args": vars(args)}
    try:
        for name in args.scenarios.split(","):
            if name != "scale" or args.scale:
                results[name] = getattr(bench, name)()
    finally:
        bench.close()
    lines, targets = report(results)
    results["targets"] = [t.as_json() for t in targets]
    print("\n".join(lines + ["", "targets:"] + [t.line() for t in targets]))
    log(f"results in {write_json(args.json, results)}")


if __name__ == "__main__":
    main()
