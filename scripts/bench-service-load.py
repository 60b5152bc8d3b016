#!/usr/bin/env python3
"""The service under load (issue 13.5): N concurrent users, each sending a chat
turn every few seconds, for M minutes, with learning on, and the same run
with learning off (`learn: false`) as the baseline; then more users to find
the knee.

usage: scripts/bench-service-load.py BINARY [--users 8,16,32] [--minutes 5]
           [--knee-minutes 3] [--interval 3] [--max-tokens 24] [--no-baseline]
           [--drain 300] [--config FILE] [--threads N]

Each run starts its own `continuum serve` the zero-config way (a private
PostgreSQL in a scratch directory, the cached default model), so runs do not
share a backlog. Each user is its own memory (`load-uN`); its turns are short
personal statements and questions, different per user and per turn (seeded),
answered greedily in at most --max-tokens tokens. A user sends its next turn
--interval seconds (±30%) after the previous answer arrived.

Printed per run and per minute of sending: requests, generate latency p50 /
p99, completion tokens/s, and the learning lag of the jobs enqueued in that
minute (from the commit that acknowledged the request to the commit that
applied its job, read from the server's database with psql): p50 / p99, and
how many were not applied when the drain ended. Then a summary table with
the targets at 8 users: lag p99 <= 10 s and not growing (last minute's p99
no more than 1.5x the first's + 1 s), generate p50 <= 1.5x learning off.
Standard library only (and psql on PATH).
"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from continuum_serve import ZeroConfigServer  # noqa: E402

THINGS = ["dog", "cat", "sister", "brother", "town", "boat", "car", "teacher", "garden", "bicycle", "friend", "horse",
          "neighbour", "band", "book", "street", "island", "doctor", "team", "tree"]
NAMES = ["Arlo", "Bexley", "Corrin", "Dovewick", "Elsbeth", "Fenwick", "Galloway", "Hollis", "Isolde", "Jaspin",
         "Kestrel", "Lorimer", "Marlowe", "Nettle", "Orrin", "Pellam", "Quenby", "Rosalind", "Sorrel", "Tamsin"]
VERBS = ["visited me today", "is doing well", "made me laugh this morning", "needs a new coat", "is older than I thought",
         "was in the news", "won a small prize", "is my favourite thing to talk about"]


def turn(rng):
    """One short chat turn: a personal statement or a question about one."""
    thing, name = rng.choice(THINGS), rng.choice(NAMES)
    if rng.random() < 0.25:
        return f"Do you remember what my {thing} is called?"
    return f"My {thing} is called {name}, and {name} {rng.choice(VERBS)}."


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def cpu():
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
    simd = [f for f in ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile"] if f in flags]
    return f"{model} ({os.cpu_count()} CPUs; {' '.join(simd)})"


class Database:
    """psql against a zero-config server's private PostgreSQL (its postmaster.pid names socket directory and port)."""

    def __init__(self, data_dir):
        lines = open(os.path.join(data_dir, "postmaster.pid")).read().splitlines()
        self.port, self.socket = lines[3].strip(), lines[4].strip()

    def query(self, sql):
        out = subprocess.run(["psql", "-h", self.socket, "-p", self.port, "-U", "continuum", "-d", "continuum", "-At", "-F", "|",
                              "-c", sql], check=True, capture_output=True, text=True).stdout.strip()
        return [l.split("|") for l in out.splitlines() if l]


def run(binary, users, minutes, learn, args):
    extra = ["--config", args.config] if args.config else []
    if args.threads:
        extra += ["--threads", str(args.threads)]
    label = f"{users} users, learning {'on' if learn else 'off'}"
    with ZeroConfigServer(binary, extra, prefix="continuum-load-") as server:
        db = Database(os.path.join(server.workdir, "data", "postgres"))
        records, lock = [], threading.Lock()
        start = time.time()
        end = start + minutes * 60
        errors = []

        def user(i):
            rng = random.Random(1000 + i)
            time.sleep(rng.uniform(0, args.interval))   # users do not start in lockstep
            while time.time() < end:
                body = json.dumps({"user": f"load-u{i}", "messages": [{"role": "user", "content": turn(rng)}],
                                   "max_tokens": args.max_tokens, "temperature": 0, "learn": learn}).encode()
                req = urllib.request.Request(server.base + "/v1/generate", body,
                                             {"Authorization": "Bearer " + server.key, "Content-Type": "application/json"})
                t0 = time.time()
                try:
                    r = json.load(urllib.request.urlopen(req, timeout=600))
                except Exception as e:  # noqa: BLE001 - reported, the run goes on
                    errors.append(repr(e))
                    time.sleep(1)
                    continue
                t1 = time.time()
                with lock:
                    records.append((t0 - start, t1 - t0, r["usage"]["completion_tokens"], (r.get("learning") or {}).get("job_id")))
                time.sleep(args.interval * rng.uniform(0.7, 1.3))

        threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
        for t in threads:
            t.start()
        last = -1
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            m = int((time.time() - start) // 60)
            if m != last and m < minutes:
                last = m
                with lock:
                    n = len(records)
                print(f"  [{label}] minute {m + 1}/{minutes}: {n} requests so far", file=sys.stderr, flush=True)
        jobs = [j for *_, j in records if j]
        drained_at = None
        if jobs:
            ids = ",".join(map(str, jobs))
            t0 = time.time()
            while time.time() - t0 < args.drain:
                left = int(db.query(f"SELECT count(*) FROM learning_jobs WHERE id IN ({ids}) AND state = 'queued'")[0][0])
                if left == 0:
                    drained_at = time.time() - t0
                    break
                print(f"  [{label}] draining: {left} jobs queued", file=sys.stderr, flush=True)
                time.sleep(5)
            lags = {int(r[0]): (r[1], float(r[2]) if r[2] else None) for r in db.query(f"""
                SELECT id, state, EXTRACT(EPOCH FROM finished_at - created_at) FROM learning_jobs WHERE id IN ({ids})""")}
        else:
            lags = {}
        if not server.alive():
            raise SystemExit(f"the server died; see {server.log_path}")
        lanes = lane_time(server, time.time() - start)

    per_minute = []
    for m in range(minutes):
        rs = [r for r in records if m * 60 <= r[0] < (m + 1) * 60]
        lat = [r[1] for r in rs]
        lag = [lags[r[3]][1] for r in rs if r[3] in lags and lags[r[3]][0] == "done" and lags[r[3]][1] is not None]
        pending = sum(1 for r in rs if r[3] in lags and lags[r[3]][0] == "queued")
        per_minute.append({"minute": m + 1, "requests": len(rs), "p50": statistics.median(lat) if lat else float("nan"),
                           "p99": pct(lat, 0.99), "tps": sum(r[2] for r in rs) / 60, "lag50": pct(lag, 0.5),
                           "lag99": pct(lag, 0.99), "pending": pending})
    lat = [r[1] for r in records]
    lag = [v[1] for v in lags.values() if v[0] == "done" and v[1] is not None]
    return {"label": label, "users": users, "learn": learn, "minutes": per_minute, "requests": len(records), "errors": errors,
            "p50": statistics.median(lat) if lat else float("nan"), "p99": pct(lat, 0.99),
            "tps": sum(r[2] for r in records) / (minutes * 60), "lag50": pct(lag, 0.5), "lag99": pct(lag, 0.99),
            "drained": drained_at, "jobs": len(jobs), "unapplied": sum(1 for v in lags.values() if v[0] != "done"),
            "lanes": lanes}


def lane_time(server, wall):
    """Where the learning lanes' time went, from the server's /metrics: the
    sums of the round, compute, audit and consolidation histograms."""
    req = urllib.request.Request(server.base + "/metrics", headers={"Authorization": "Bearer " + server.key})
    text = urllib.request.urlopen(req, timeout=60).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line.split(" ")[0]:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)

    def get(name):
        return values.get(name, 0.0)
    return {"wall": wall, "jobs": get("continuum_learning_jobs_applied_total"),
            "rounds": get("continuum_learning_round_seconds_count"), "round_s": get("continuum_learning_round_seconds_sum"),
            "compute_s": get("continuum_learning_compute_seconds_sum"), "audits": get("continuum_audits_total"),
            "audit_s": get("continuum_audit_seconds_sum"), "consolidation_s": get("continuum_consolidation_seconds_sum")}


def show(r):
    print(f"### {r['label']}: {r['requests']} requests, {len(r['errors'])} errors")
    print()
    print("| minute | requests | generate p50 (s) | generate p99 (s) | tokens/s | learning lag p50 (s) | lag p99 (s) | not applied |")
    print("|---|---|---|---|---|---|---|---|")
    for m in r["minutes"]:
        lag = f"{m['lag50']:.2f} | {m['lag99']:.2f} | {m['pending']}" if r["learn"] else "– | – | –"
        print(f"| {m['minute']} | {m['requests']} | {m['p50']:.2f} | {m['p99']:.2f} | {m['tps']:.1f} | {lag} |")
    if r["learn"]:
        drained = f"drained {r['drained']:.0f} s after the load stopped" if r["drained"] is not None else f"NOT drained within the drain limit ({r['unapplied']} jobs left)"
        print(f"\nLearning: {r['jobs']} jobs, lag p50 {r['lag50']:.2f} s, p99 {r['lag99']:.2f} s; {drained}.")
    t = r["lanes"]
    if t["rounds"]:
        print(f"\nLanes, over {t['wall']:.0f} s from the first request to the end of the drain: {t['jobs']:.0f} jobs in "
              f"{t['rounds']:.0f} rounds ({t['jobs'] / t['rounds']:.1f} jobs a round), rounds {t['round_s']:.1f} s "
              f"(compute {t['compute_s']:.1f} s, {1000 * t['compute_s'] / max(1, t['jobs']):.0f} ms a job); "
              f"{t['audits']:.0f} audits {t['audit_s']:.1f} s; consolidations {t['consolidation_s']:.1f} s.")
    if r["errors"]:
        print(f"\nFirst error: {r['errors'][0]}")
    print(flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("--users", default="8,16,32")
    ap.add_argument("--minutes", type=int, default=5, help="minutes of load for the first (target) user count")
    ap.add_argument("--knee-minutes", type=int, default=3, help="minutes of load for the other user counts")
    ap.add_argument("--interval", type=float, default=3.0)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--drain", type=float, default=300.0)
    ap.add_argument("--no-baseline", action="store_true", help="skip the learning-off run")
    ap.add_argument("--config")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    counts = [int(x) for x in args.users.split(",")]
    print(f"CPU: {cpu()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; binary {args.binary}")
    print(f"Each user: a chat turn every {args.interval:g} s (±30%) after its previous answer, greedy, at most {args.max_tokens} tokens.")
    print(flush=True)
    results = []
    for k, n in enumerate(counts):
        minutes = args.minutes if k == 0 else args.knee_minutes
        if k == 0 and not args.no_baseline:
            results.append(run(args.binary, n, minutes, False, args))
            show(results[-1])
        results.append(run(args.binary, n, minutes, True, args))
        show(results[-1])
    print("### Summary")
    print()
    print("| users | learning | requests | generate p50 (s) | p99 (s) | tokens/s | lag p50 (s) | lag p99 (s) | lag p99 first → last minute | drained after (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        trend = f"{r['minutes'][0]['lag99']:.2f} → {r['minutes'][-1]['lag99']:.2f}" if r["learn"] else "–"
        lag = f"{r['lag50']:.2f} | {r['lag99']:.2f}" if r["learn"] else "– | –"
        drained = (f"{r['drained']:.0f}" if r["drained"] is not None else "not drained") if r["learn"] else "–"
        print(f"| {r['users']} | {'on' if r['learn'] else 'off'} | {r['requests']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['tps']:.1f} | {lag} | {trend} | {drained} |")
    first = [r for r in results if r["users"] == counts[0]]
    on = next((r for r in first if r["learn"]), None)
    off = next((r for r in first if not r["learn"]), None)
    if on:
        lag_ok = on["lag99"] <= 10
        m = on["minutes"]
        growing = m[-1]["lag99"] > 1.5 * m[0]["lag99"] + 1
        print(f"\nAt {counts[0]} users: lag p99 {on['lag99']:.2f} s (<= 10 s: {'met' if lag_ok else 'NOT met'}); "
              f"per-minute p99 {'growing' if growing else 'not growing'} ({m[0]['lag99']:.2f} → {m[-1]['lag99']:.2f})", end="")
        if off:
            ratio = on["p50"] / off["p50"]
            print(f"; generate p50 {on['p50']:.2f} s vs {off['p50']:.2f} s learning off = {ratio:.2f}x (<= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})", end="")
        print(".")


if __name__ == "__main__":
    main()
