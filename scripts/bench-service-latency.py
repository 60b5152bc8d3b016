#!/usr/bin/env python3
"""Generate latency with N concurrent users against a running `continuum serve`.

usage: scripts/bench-service-latency.py KEY N ROUNDS [URL]
Each round sends N chat requests at once (greedy, 32 tokens max, different
users and prompts) and prints the wall time and aggregate tokens/s; the last
line gives the request latency median and maximum over all rounds."""
import json, sys, threading, time, urllib.request, statistics
key, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
URL = sys.argv[4] if len(sys.argv) > 4 else "http://127.0.0.1:8080/v1/generate"
prompts = ["Tell me about the ocean.", "Write a short poem about trees.", "What is machine learning?", "Describe a city at night.",
           "Explain how rain forms.", "Give three tips for studying.", "What do cats like?", "Summarise the history of bread."]
lat = []
def one(i):
    body = json.dumps({"user": f"u{i}", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": 32, "temperature": 0}).encode()
    req = urllib.request.Request(URL, body, {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    t = time.time(); r = json.load(urllib.request.urlopen(req)); lat.append((time.time() - t, r["usage"]["completion_tokens"]))
for _ in range(rounds):
    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.time(); [t.start() for t in ts]; [t.join() for t in ts]; wall = time.time() - t0
    print(f"{n} concurrent: wall {wall:.2f} s, aggregate {sum(c for _, c in lat[-n:]) / wall:.1f} tokens/s")
xs = sorted(l for l, _ in lat)
print(f"latency over {len(xs)} requests (32 tokens max): p50 {statistics.median(xs):.2f} s, max {xs[-1]:.2f} s")
