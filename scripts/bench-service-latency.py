#!/usr/bin/env python3
"""Generate latency with N concurrent users against a running `continuum serve`,
and the learning lag of the jobs those requests enqueued.

usage: [DATABASE_URL=postgres://…] scripts/bench-service-latency.py KEY N ROUNDS [URL]
Each round sends N chat requests at once (greedy, 32 tokens max, different
users and prompts; each request's user message is learned after the
response) and prints the wall time and aggregate tokens/s; then the request
latency median, p99 and maximum over all rounds. With DATABASE_URL (the
server's database; psql reads it), it waits until the run's learning jobs are
applied and prints their lag, from the commit that acknowledged the request
to the commit that applied its job: p50, p99, max."""
import json, os, statistics, subprocess, sys, threading, time, urllib.request
key, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
URL = sys.argv[4] if len(sys.argv) > 4 else "http://127.0.0.1:8080/v1/generate"
DB = os.environ.get("DATABASE_URL")
prompts = ["Tell me about the ocean.", "Write a short poem about trees.", "What is machine learning?", "Describe a city at night.",
           "Explain how rain forms.", "Give three tips for studying.", "What do cats like?", "Summarise the history of bread."]
run = f"bench{int(time.time())}"
lat, jobs = [], []
def one(i):
    body = json.dumps({"user": f"{run}-u{i}", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                       "max_tokens": 32, "temperature": 0}).encode()
    req = urllib.request.Request(URL, body, {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    t = time.time(); r = json.load(urllib.request.urlopen(req)); lat.append((time.time() - t, r["usage"]["completion_tokens"]))
    if r.get("learning", {}).get("job_id"): jobs.append(r["learning"]["job_id"])
for _ in range(rounds):
    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.time(); [t.start() for t in ts]; [t.join() for t in ts]; wall = time.time() - t0
    print(f"{n} concurrent: wall {wall:.2f} s, aggregate {sum(c for _, c in lat[-n:]) / wall:.1f} tokens/s")
xs = sorted(l for l, _ in lat)
p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
print(f"latency over {len(xs)} requests (32 tokens max): p50 {statistics.median(xs):.2f} s, p99 {p99:.2f} s, max {xs[-1]:.2f} s")
if DB and jobs:
    ids = ",".join(map(str, jobs))
    def psql(sql):
        return subprocess.run(["psql", DB, "-At", "-c", sql], check=True, capture_output=True, text=True).stdout.strip()
    while psql(f"SELECT count(*) FROM learning_jobs WHERE id IN ({ids}) AND state = 'queued'") != "0":
        time.sleep(0.5)
    lag = psql(f"""SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s), percentile_cont(0.99) WITHIN GROUP (ORDER BY s), max(s)
                   FROM (SELECT EXTRACT(EPOCH FROM finished_at - created_at) AS s FROM learning_jobs WHERE id IN ({ids})) x""")
    p50, p99, mx = (float(v) for v in lag.split("|"))
    print(f"learning lag over {len(jobs)} jobs (response commit to applied): p50 {p50:.2f} s, p99 {p99:.2f} s, max {mx:.2f} s")
