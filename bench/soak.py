"""Soak: two gateways sharing one Redis, 1000 mixed client connections for 10 minutes, then an audit.

    python bench/soak.py                                  # 10 minutes, 1000 connections
    python bench/soak.py --minutes 1 --connections 200    # a quick run

It starts real Faktory, the Ent stand-in in front of it, one Redis and two gateways (`--redis`, the
same store) in front of the stand-in, all on free loopback ports. A separate load process (this
file with `--load`; its code is bench/soakload/, a module per role; asyncio + uvloop, raw sockets, no
Faktory library, nothing from gateway/) opens the connections, split evenly across the two gateways:

- producers (most of them): a PUSH every few seconds each;
- workers: FETCH, a few ms of "work", ACK (some FAIL), a BEAT every 15 s;
- batch producers: BATCH NEW, PUSH members, BATCH COMMIT, now and then a legal BATCH STATUS or
  BATCH OPEN of their own open batch, and deliberate violations of a batch committed earlier
  (through either gateway): a PUSH into it, BATCH OPEN of it, BATCH NEW with it as parent.

The load is paced: every 5 s the pacing scale is nudged so the machine is about --target-cpu busy.
Every 30 s it reports throughput and latency per command kind, refusals by code and each gateway's
RSS and open fds. At the end the producers stop, the workers drain the queue, and the audit runs:
every job that got +OK is acked or still in Faktory; every refusal hit a batch committed earlier;
no violation was admitted; the stand-in saw nothing join a committed or fired batch; the gateways'
own refusal counters agree; fds return to their baseline. See bench/README.md, section "Soak".
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.lib, tests.support

from bench.lib.process import Tag, children_of, memory_and_fds, raise_nofile, stop_all, tagged
from bench.lib.report import RESULTS, Check, log, ms, write_json
from bench.lib.resp import redis_info, redis_value
from bench.soakload import load
from bench.soakload.client import Role
from bench.soakload.jobs import CB_QUEUE
from bench.soakload.spec import SoakSpec
from tests.support.processes import FaktoryServer, GatewayProcess, RedisServer
from tests.support.standin import StandinProcess

REPO = Path(__file__).resolve().parents[1]


def role_counts(conns: int, workers: float, batchers: float) -> dict[Role, int]:
    w = max(2, round(conns * workers))
    b = max(2, round(conns * batchers))
    return {Role.WORKER: w, Role.BATCH: b, Role.PRODUCER: conns - w - b}


def metric_values(text: str, name: str) -> dict[str, float]:
    """Samples of one metric from a Prometheus exposition: {labels: value}."""
    out = {}
    for match in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE):
        out[match.group(1) or ""] = float(match.group(2))
    return out


def redis_memory(url: str) -> dict | None:
    """Keys and used_memory of the ledger Redis."""
    try:
        return {
            "keys": int(redis_value(url, "DBSIZE")),
            "used_memory": int(redis_info(url, "memory")["used_memory"]),
        }
    except OSError:
        return None


def format_tick(tick: dict) -> str:
    lines = []
    head = (
        f"[{time.strftime('%H:%M:%S')}] t={tick['t_s']:.0f}s{' (final, drain)' if tick['final'] else ''}: "
        f"{tick['commands_per_s']:.0f} cmd/s, machine {tick['machine_busy_pct']:.0f}% busy, "
        f"pacing x{tick['scale']:.2f}, {tick['open_conns']} conns open, {tick['jobs_pushed']} jobs sent"
    )
    lines.append(head)
    lines.append(f"  {'kind':16} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8}")
    for kind, k in tick["kinds"].items():
        lines.append(
            f"  {kind:16} {k['per_s']:8.1f} {ms(k['p50_us']):>8} {ms(k['p99_us']):>8} "
            f"{ms(k['p999_us']):>9} {ms(k['max_us']):>8}"
        )
    refused = ", ".join(f"{c} {n}" for c, n in sorted(tick["refusals"].items())) or "none"
    lines.append(
        f"  refusals this period: {refused} (run total {tick['refusals_total']}); "
        f"server errors {tick['server_errors_total']}, problems {tick['problems_total']}, "
        f"lost connections {tick['lost_total']}"
    )
    gws = "; ".join(
        f"{name} RSS {g['rss_kib'] / 1024:.1f} MiB, {g['fds']} fds, {tick['cores'].get(name, 0):.2f} cores"
        for name, g in tick["gateways"].items()
        if g["rss_kib"] is not None
    )
    lines.append(f"  {gws}")
    others = ", ".join(f"{n} {c:.2f}" for n, c in tick["cores"].items() if not n.startswith("gw-"))
    lines.append(f"  cores: {others}")
    return "\n".join(lines)


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.faktory = self.standin = self.redis = None
        self.gateways: list = []

    def start(self) -> None:
        log("starting Faktory, the Ent stand-in, Redis and two gateways (--redis)")
        self.faktory = FaktoryServer().start()
        self.faktory_pids = [self.faktory.proc.pid, *children_of(self.faktory.proc.pid)]
        self.standin = StandinProcess(self.faktory.url).start()
        self.redis = RedisServer().start()
        for _ in range(2):
            self.gateways.append(
                GatewayProcess(self.standin.url, "--redis", self.redis.url, *self.args.gateway_flag).start()
            )
        log(
            "pids: faktory %s, stand-in %d, redis %d, gateways %s"
            % (
                self.faktory_pids,
                self.standin.proc.pid,
                self.redis.proc.pid,
                [g.proc.pid for g in self.gateways],
            )
        )

    def stop(self) -> None:
        stop_all(*self.gateways, self.standin, self.redis, self.faktory)

    def gateway_names(self) -> dict[str, int]:
        return {f"gw-{'ab'[i]}": g.proc.pid for i, g in enumerate(self.gateways)}

    def gateway_metrics(self) -> dict:
        out = {}
        for name, gateway in zip(self.gateway_names(), self.gateways, strict=True):
            _, text = gateway.http("/metrics")
            refusals = {
                re.search(r'code="([^"]+)"', k).group(1): v
                for k, v in metric_values(text, "faktory_gateway_refusals_total").items()
            }
            out[name] = {
                "refusals": refusals,
                "connections_active": metric_values(text, "faktory_gateway_connections_active").get(""),
                "store_errors": sum(metric_values(text, "faktory_gateway_store_errors_total").values()),
                "protocol_errors": sum(metric_values(text, "faktory_gateway_protocol_errors_total").values()),
                "refused_log_lines": sum('"message":"refused"' in line for line in gateway.output),
                "alive": gateway.proc.poll() is None,
            }
        return out

    def run(self) -> dict:
        args = self.args
        roles = role_counts(args.connections, args.workers, args.batchers)
        time.sleep(1.0)
        names = self.gateway_names()
        baseline = {n: memory_and_fds(p) for n, p in names.items()}
        spec = SoakSpec(
            gateways=[g.url for g in self.gateways],
            faktory_url=self.faktory.url,
            standin_url=self.standin.url,
            conns=args.connections,
            roles=roles,
            duration=args.minutes * 60,
            report_every=args.report_every,
            target_cpu=args.target_cpu / 100,
            scale=args.scale,
            max_scale=args.max_scale,
            push_interval=args.push_interval,
            batch_interval=args.batch_interval,
            violation_rate=args.violation_rate,
            fail_rate=args.fail_rate,
            work_ms=args.work_ms,
            payload=args.payload,
            max_jobs=args.max_jobs,
            drain_s=args.drain,
            seed=args.seed,
            gateway_pids=names,
            watch={
                **{n: [p] for n, p in names.items()},
                "standin": [self.standin.proc.pid],
                "faktory+redis": self.faktory_pids,
                "ledger-redis": [self.redis.proc.pid],
            },
        )
        proc = subprocess.Popen(
            [sys.executable, __file__, "--load", spec.to_json()],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        limit = args.minutes * 60 + args.drain + 240
        timer = threading.Timer(limit, proc.kill)  # bounded: the load process cannot outlive this
        timer.start()
        ticks, result = [], None
        try:
            for line in proc.stdout:
                if (tick := tagged(line, Tag.TICK)) is not None:
                    ticks.append(tick)
                    print(format_tick(tick), flush=True)
                elif (done := tagged(line, Tag.RESULT)) is not None:
                    result = done
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if result is None:
            raise RuntimeError(f"the load process ended without a result (exit {proc.returncode})")
        time.sleep(2.0)  # let the gateways close the upstream sides
        result["gateways"]["baseline"] = baseline
        result["gateways"]["after_close"] = {n: memory_and_fds(p) for n, p in names.items()}
        result["gateway_metrics"] = self.gateway_metrics()
        result["ledger_redis"] = redis_memory(self.redis.url)
        result["processes_alive"] = {
            "faktory": self.faktory.proc.poll() is None,
            "standin": self.standin.proc.poll() is None,
            "redis": self.redis.proc.poll() is None,
            **{n: g.proc.poll() is None for n, g in zip(names, self.gateways, strict=True)},
        }
        result["ticks"] = ticks
        return result


def jobs_accounted(result: dict) -> Check:
    jobs = result["audit"]["jobs"]
    fk = jobs["in_faktory"]
    detail = (
        f"{jobs.get('ok', 0)} PUSHes answered +OK = {jobs.get('ok_acked', 0)} acked by the workers + "
        f"{jobs['outstanding_expected']} outstanding; Faktory holds {jobs['in_faktory_total']} (queue "
        f"{fk['queue']}, retries {fk['retries']}, dead {fk['dead']}, scheduled {fk['scheduled']}, working "
        f"{fk['working']}); refused but delivered {jobs.get('refused_but_delivered', 0)}, delivered but "
        f"never pushed {jobs.get('delivered_never_pushed', 0)}, unanswered {jobs.get('unanswered', 0)}"
    )
    return Check("every +OK job accounted for", jobs["passed"], detail)


def refusals_legitimate(result: dict) -> Check:
    v, problems = result["audit"]["violations"], result["problems"]
    illegit = problems.get("refusal not legitimate", 0) + problems.get("legal command refused", 0)
    detail = (
        f"{v['total_refusals']} refusals, {v['legit_refusals']} of them violations aimed at a batch the "
        f"generator had committed before sending; legal commands refused: "
        f"{problems.get('legal command refused', 0)}; wrong code or target: "
        f"{problems.get('refusal not legitimate', 0)}"
    )
    return Check(
        "every refusal legitimate", illegit == 0 and v["legit_refusals"] == v["total_refusals"], detail
    )


def violations_refused(result: dict) -> Check:
    v, problems = result["audit"]["violations"], result["problems"]
    sent = sum(v["sent"].values())
    refused = sum(v["refused_legitimately"].values())
    by_kind = ", ".join(
        f"{k} {v['refused_legitimately'].get(k, 0)}/{n}" for k, n in sorted(v["sent"].items())
    )
    detail = (
        f"{refused} of {sent} refused ({by_kind}); {v['cross_gateway']} sent through the other gateway than "
        f"the one that committed the batch; admitted: {problems.get('violation admitted', 0)}"
    )
    return Check(
        "every violation refused", problems.get("violation admitted", 0) == 0 and refused == sent, detail
    )


def standin_clean(result: dict) -> Check:
    s = result["audit"]["standin"]
    joined = s["joined"]
    return Check(
        "stand-in: nothing joined a committed or fired batch",
        s["passed"],
        f"{s['batches_reported']} batches ({s['batches_committed']} committed by the generator); joined "
        f"while committed {joined.get('joined_while_committed', 0)}, after callback "
        f"{joined.get('joined_after_callback', 0)}, child batches while committed "
        f"{joined.get('children_while_committed', 0)} / after callback "
        f"{joined.get('children_after_callback', 0)}; member totals differing from the +OK count "
        f"{s['member_count_mismatches']}; committed batches reopened {s['committed_but_reopened']}; "
        f"callbacks {s['callback_states']}",
    )


def counters_agree(result: dict) -> Check:
    gm = result["gateway_metrics"]
    metric_refusals = Counter()
    for g in gm.values():
        metric_refusals.update(g["refusals"])
    metric_refusals = {k: int(n) for k, n in metric_refusals.items() if n}
    logged = sum(g["refused_log_lines"] for g in gm.values())
    agree = metric_refusals == result["refusals"] and logged == sum(result["refusals"].values())
    detail = (
        f"faktory_gateway_refusals_total {metric_refusals}, 'refused' log lines {logged}; client saw "
        f"{result['refusals']}"
    )
    return Check("gateway counters agree with the client", agree, detail)


def no_errors(result: dict) -> Check:
    errors = sum(result["server_errors"].values())
    lost = sum(result["lost_connections"].values())
    audited = ("refusal not legitimate", "legal command refused", "violation admitted")  # the checks above
    other = {k: n for k, n in result["problems"].items() if k not in audited}
    store = sum(g["store_errors"] for g in result["gateway_metrics"].values())
    alive = all(result["processes_alive"].values())
    passed = not errors and not lost and not result["stalls"] and not other and not store and alive
    detail = (
        f"server errors {errors}, lost connections {lost}, stalls {result['stalls']}, store errors {store}, "
        f"other problems {other or 0}, processes alive {alive}"
    )
    return Check("no errors, stalls or lost connections", passed, detail)


def fds_steady(result: dict) -> Check:
    g = result["gateways"]
    passed = True
    parts = []
    for name in g["baseline"]:
        b, st, e, a = (g[k][name]["fds"] for k in ("baseline", "start", "end", "after_close"))
        passed &= a is not None and b is not None and a <= b + 2 and abs(e - st) <= 4
        parts.append(f"{name} {b} idle, {st} at start, {e} at end, {a} after close")
    return Check("gateway fds: steady under load, back to baseline", passed, "; ".join(parts))


def rss_steady(result: dict) -> Check:
    g = result["gateways"]
    # Warm = at the first report, after 30 s of load (allocator pools and caches filled).
    first = next((t for t in result["ticks"] if not t["final"]), None)
    passed = True
    parts = []
    for name in g["baseline"]:
        b, st, e, a = (g[k][name]["rss_kib"] for k in ("baseline", "start", "end", "after_close"))
        warm = first["gateways"][name]["rss_kib"] if first else st
        passed &= e - warm <= max(0.10 * warm, 5 * 1024)
        parts.append(
            f"{name} {b / 1024:.1f} MiB idle, {st / 1024:.1f} with the connections open, {warm / 1024:.1f} "
            f"at the first report, {e / 1024:.1f} at the end ({100 * (e - warm) / warm:+.1f}% from the first "
            f"report), {a / 1024:.1f} after close"
        )
    return Check("gateway RSS: growth under load <= 10% (or 5 MiB)", passed, "; ".join(parts))


def ledger_redis(result: dict) -> Check | None:
    ledger = result.get("ledger_redis")
    if not ledger:
        return None
    batches = result["audit"]["standin"]["batches_reported"]
    detail = (
        f"{ledger['keys']} keys, {ledger['used_memory'] / 2**20:.1f} MiB used for {batches} batches "
        "(records are kept for batch_retention, 7 days by default)"
    )
    return Check("ledger Redis", None, detail)


AUDIT = (jobs_accounted, refusals_legitimate, violations_refused, standin_clean, counters_agree, no_errors,
         fds_steady, rss_steady, ledger_redis)  # fmt: skip


def checks(result: dict) -> list[Check]:
    """The audit, each check PASS or FAIL, and the ledger Redis's figures for information."""
    return [check for audit in AUDIT if (check := audit(result)) is not None]


def summary(result: dict, meta: dict) -> str:
    lines = []
    roles = result["roles"]
    ticks = [t for t in result["ticks"] if not t["final"]]
    busy = [t["machine_busy_pct"] for t in ticks if t["machine_busy_pct"] is not None]
    lines.append("=" * 100)
    lines.append(
        f"SOAK SUMMARY  {meta['when']}  {result['run_seconds'] / 60:.1f} min of load, "
        f"{sum(roles.values())} connections over 2 gateways sharing one Redis"
    )
    lines.append(
        f"  roles: {roles['producer']} producers, {roles['worker']} workers, {roles['batch']} batch producers; "
        f"machine {meta['cpus']} CPUs"
    )
    if busy:
        lines.append(
            f"  machine busy per report: mean {sum(busy) / len(busy):.0f}%, min {min(busy):.0f}%, "
            f"max {max(busy):.0f}%; pacing scale {ticks[0]['scale']:.2f} -> {ticks[-1]['scale']:.2f}"
        )
        cores = Counter()
        for t in ticks:
            cores.update(t["cores"])
        lines.append("  mean cores busy: " + ", ".join(f"{n} {c / len(ticks):.2f}" for n, c in cores.items()))
    kinds = result["kinds"]
    total = sum(k["n"] for k in kinds.values())
    lines.append(f"  {total} commands, {total / result['run_seconds']:.0f}/s over the run (drain included)")
    lines.append("")
    lines.append(
        f"  {'kind':16} {'count':>9} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8}"
    )
    for kind, k in kinds.items():
        lines.append(
            f"  {kind:16} {k['n']:9d} {k['per_s']:8.1f} {ms(k['p50_us']):>8} {ms(k['p99_us']):>8} "
            f"{ms(k['p999_us']):>9} {ms(k['max_us']):>8}"
        )
    lines.append("  (FETCH-empty is a FETCH that found no job: the server holds it about 2 s by design)")
    lines.append("")
    by_kind = ", ".join(f"{k} {n}" for k, n in sorted(result["refusals_by_kind"].items())) or "none"
    lines.append(f"  refusals by code: {result['refusals'] or 'none'}")
    lines.append(f"  refusals by command and code: {by_kind}")
    if result["server_errors"]:
        lines.append(f"  server errors: {result['server_errors']}")
    jobs = result["audit"]["jobs"]
    lines.append(
        f"  callbacks: {jobs['callbacks_fetched']} fetched, {jobs['callbacks_acked']} acked, "
        f"{jobs['callback_queue']} left in {CB_QUEUE}; duplicate deliveries {jobs['duplicate_deliveries']}"
    )
    lines.append("")
    lines.append("  AUDIT")
    verdict = True
    for check in checks(result):
        verdict &= check.passed is not False
        lines.extend(check.lines())
    for example in result["examples"][:10] + result["lost_examples"][:5] + jobs["anomalies"][:5]:
        lines.append(f"  note: {example}")
    lines.append("")
    lines.append(f"  RESULT: {'PASS' if verdict else 'FAIL'}")
    lines.append("=" * 100)
    result["passed"] = verdict
    return "\n".join(lines)


# The load's knobs (the flags with a value): (flag, type, default, help).
FLAGS = (
    ("--minutes", float, 10.0, "minutes of load (default 10)"),
    ("--connections", int, 1000, "client connections (default 1000)"),
    ("--workers", float, 0.15, "fraction of connections that are workers"),
    ("--batchers", float, 0.10, "fraction that are batch producers"),
    ("--target-cpu", float, 65.0, "machine busy %% the pacing aims at (0: fixed pacing at --scale)"),
    ("--scale", float, 2.0, "initial pacing scale (rates multiply by it; default 2)"),
    ("--max-scale", float, 40.0, "upper bound of the pacing scale"),
    ("--push-interval", float, 5.0, "mean seconds between a producer's PUSHes at scale 1 (default 5)"),
    ("--batch-interval", float, 5.0, "mean seconds between a batch producer's batches at scale 1 (default 5)"),
    ("--violation-rate", float, 0.3, "chance that a batch producer follows a commit with a violation (default 0.3)"),
    ("--fail-rate", float, 0.03, "chance a worker FAILs a job (default 0.03)"),
    ("--work-ms", float, 5.0, "mean simulated work per job, ms (default 5)"),
    ("--payload", int, 100, "bytes of padding in each job's args"),
    ("--max-jobs", int, 5_000_000, "stop pushing after this many jobs"),
    ("--drain", float, 30.0, "max seconds for the workers to drain at the end"),
    ("--report-every", float, 30.0, "seconds between reports (default 30)"),
)  # fmt: skip


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--load":
        load.main(SoakSpec.from_json(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, kind, default, text in FLAGS:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--gateway-flag",
        action="append",
        default=[],
        help="extra gateway flag, repeatable (--gateway-flag=--mode=strict)",
    )
    parser.add_argument(
        "--json", default=str(RESULTS / "soak-latest.json"), help="where to write the results"
    )
    args = parser.parse_args()
    if not 10 <= args.connections <= 1800:
        parser.error(
            "--connections must be 10..1800 (Faktory OSS accepts 2000; the stand-in dials one per client)"
        )
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    raise_nofile(args.connections * 4 + 1000)  # the gateways and the stand-in inherit it
    soak = Soak(args)
    started = time.time()
    try:
        soak.start()
        result = soak.run()
    finally:
        soak.stop()
    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "cpus": os.cpu_count(),
        "args": vars(args),
    }
    text = summary(result, meta)
    print(text)
    result["checks"] = [check.as_json() for check in checks(result)]
    out = write_json(args.json, {"meta": meta, **result, "summary": text})
    log(f"written to {out} in {meta['seconds']} s")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
