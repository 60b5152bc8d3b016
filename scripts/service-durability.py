#!/usr/bin/env python3
"""Two `continuum serve` processes on one PostgreSQL: exactly-once learning.

Run by `make test` (after the build) as
    scripts/service-durability.py .build/debug/continuum

1. Two replicas share one database (the first starts the private PostgreSQL
   in a scratch data directory, the second shares it). Hundreds of concurrent
   learning requests for ONE user are split across both; when the queue has
   drained, every job must be applied exactly once: jobs_applied equals the
   requests, and each level's token counter equals the sum of the requests'
   learnable tokens (a job applied twice, or two rounds of one user run
   concurrently, would break the counts). A second user is taught at the
   same time: while one replica's worker holds a user, the other's takes the
   other user, so both replicas' workers apply jobs (with one user alone,
   whichever worker claims it first may keep it, correctly).
2. kill -9 of a replica while jobs are being learned, then a restart: every
   acknowledged generation has its job applied, no job is applied twice (the
   counters equal the sum over the jobs the database recorded).

Standard library only; psql checks the database. Exits non-zero on failure.
"""
import concurrent.futures as futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/debug/continuum")
N_REQUESTS = int(os.environ.get("DURABILITY_REQUESTS", "200"))
# Requests for a second user taught at the same time (so both replicas' workers have a user to claim).
N_OTHER = 40
failures = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else ": " + detail), flush=True)
    if not ok:
        failures.append(name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, key, body=None, timeout=300):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Replica:
    def __init__(self, workdir, name, port, extra):
        self.name, self.port = name, port
        self.log = open(os.path.join(workdir, f"{name}.log"), "ab")
        self.out = os.path.join(workdir, f"{name}.out")
        self.proc = subprocess.Popen([BIN, "serve", "--port", str(port)] + extra,
                                     stdout=open(self.out, "ab"), stderr=self.log)

    def wait_ready(self, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}; see its log")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} not ready after {timeout} s")

    def api_key(self):
        for line in open(self.out):
            if line.startswith("API key: "):
                return line.split(": ", 1)[1].strip()
        return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def psql(url, sql):
    return subprocess.run(["psql", url, "-At", "-c", sql], check=True, capture_output=True, text=True).stdout.strip()


def wait_drained(port, key, user, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = request(port, "GET", f"/v1/users/{user}/memory", key)
        if m["queued_jobs"] == 0:
            # Read again: the first read may have raced the last round's commit.
            return request(port, "GET", f"/v1/users/{user}/memory", key)
        time.sleep(0.5)
    raise SystemExit(f"{user}'s jobs did not drain in {timeout} s")


def main():
    workdir = tempfile.mkdtemp(prefix="continuum-durability-")
    levels = os.path.join(workdir, "levels.json")
    # Small, quick levels: the last six layers, width 8, fast every 16 tokens, mid every 32.
    json.dump({"levels": [
        {"name": "mid", "chunk_size": 32, "width": 8, "layers": list(range(24, 30)), "learning_rate": 3e-3},
        {"name": "fast", "chunk_size": 16, "width": 8, "layers": list(range(24, 30)), "learning_rate": 1e-2},
    ], "min_surprise": 0}, open(levels, "w"))
    config = os.path.join(workdir, "service.json")
    # Auditing is off here: this checks the queue, not drift (AuditTests does).
    json.dump({"learning_workers": 1, "learning_batch": 4, "max_queued": 256, "max_batch": 16, "audit": False},
              open(config, "w"))
    common = ["--data-dir", workdir, "--levels", levels, "--config", config]
    ports = [free_port(), free_port()]
    a = Replica(workdir, "a", ports[0], common)
    replicas = [a]
    try:
        a.wait_ready()
        key = a.api_key()
        check("first replica printed an API key", key is not None)
        b = Replica(workdir, "b", ports[1], common)
        replicas.append(b)
        b.wait_ready()
        # The private PostgreSQL listens only on a Unix socket: postmaster.pid
        # has its port (line 4) and socket directory (line 5).
        pid_lines = open(os.path.join(workdir, "postgres", "postmaster.pid")).read().split("\n")
        pg_port, pg_socket_dir = pid_lines[3].strip(), pid_lines[4].strip()
        url = f"postgresql://continuum@/continuum?host={urllib.parse.quote(pg_socket_dir, safe='/')}&port={pg_port}"

        # 1. Hundreds of concurrent learning requests for one user, split across both replicas.
        def teach(i, user, port):
            r = request(port, "POST", "/v1/generate", key,
                        {"user": user, "prompt": f"Locker {i} opens with code {1000 + 7 * i}.",
                         "max_tokens": 1, "temperature": 0})
            return r["usage"]["prompt_tokens"] - 1   # learnable targets: every prompt token after the first

        started = time.time()
        with futures.ThreadPoolExecutor(16) as pool:
            other = [pool.submit(teach, N_REQUESTS + i, "other", ports[i % 2]) for i in range(N_OTHER)]
            learnable = list(pool.map(lambda i: teach(i, "shared", ports[i % 2]), range(N_REQUESTS)))
            for f in other:
                f.result()
        m = wait_drained(ports[0], key, "shared")
        m_other = wait_drained(ports[0], key, "other")
        check(f"the other user's jobs_applied == {N_OTHER}", m_other["jobs_applied"] == N_OTHER, str(m_other["jobs_applied"]))
        elapsed = time.time() - started
        print(f"     {N_REQUESTS} requests across 2 replicas learned in {elapsed:.1f} s", flush=True)
        check(f"jobs_applied == {N_REQUESTS}", m["jobs_applied"] == N_REQUESTS, str(m["jobs_applied"]))
        total = sum(learnable)
        for level in m["levels"]:
            check(f"level {level['name']} counted {total} tokens", level["tokens"] == total, str(level["tokens"]))
            chunk = 16 if level["name"] == "fast" else 32
            check(f"level {level['name']} applied one update per chunk",
                  level["updates_applied"] + level["updates_rejected"] == total // chunk,
                  f"{level['updates_applied']}+{level['updates_rejected']} vs {total // chunk}")
        done = psql(url, "SELECT count(*), count(DISTINCT id) FROM learning_jobs WHERE state = 'done'")
        check("every job done once in the database", done == f"{N_REQUESTS + N_OTHER}|{N_REQUESTS + N_OTHER}", done)
        per_replica = []
        for p in ports:
            text = urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics").read().decode()
            line = next(l for l in text.splitlines() if l.startswith("continuum_learning_jobs_applied_total "))
            per_replica.append(float(line.split()[1]))
        check("both replicas' workers applied jobs", all(x > 0 for x in per_replica) and sum(per_replica) == N_REQUESTS + N_OTHER,
              str(per_replica))
        lag = psql(url, """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM finished_at - created_at)),
                                  percentile_cont(0.99) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM finished_at - created_at))
                           FROM learning_jobs""")
        print(f"     learning lag under this burst (s): p50|p99 = {lag}", flush=True)

        # 2. kill -9 of replica a while jobs are being learned; restart; nothing lost or doubled.
        acknowledged, errors = [], 0
        def teach_ack(i):
            port = ports[i % 2]
            try:
                r = request(port, "POST", "/v1/generate", key,
                            {"user": "crash", "prompt": f"Entry {i}: the blue door opens with key {3 * i + 11}.",
                             "max_tokens": 1, "temperature": 0})
                return r["id"]
            except (urllib.error.URLError, ConnectionError, OSError):
                return None
        with futures.ThreadPoolExecutor(8) as pool:
            pending = [pool.submit(teach_ack, i) for i in range(60)]
            # Kill once some jobs are applied and others still queued.
            deadline = time.time() + 300
            while time.time() < deadline:
                q = psql(url, "SELECT count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state = 'queued') "
                              "FROM learning_jobs j JOIN users u ON u.id = j.user_id WHERE u.name = 'crash'").split("|")
                if int(q[0]) >= 5 and int(q[1]) >= 5:
                    break
                time.sleep(0.05)
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()
            print(f"     killed replica a (done|queued at the kill: {'|'.join(q)})", flush=True)
            for f in pending:
                gid = f.result()
                if gid is None:
                    errors += 1
                else:
                    acknowledged.append(gid)
        a = Replica(workdir, "a2", ports[0], common)
        replicas[0] = a
        a.wait_ready()
        m = wait_drained(ports[1], key, "crash")
        ids = ",".join("'" + g[len("gen-"):] + "'" for g in acknowledged)
        lost = psql(url, f"""SELECT count(*) FROM generations g WHERE g.id IN ({ids}) AND NOT EXISTS (
                                 SELECT 1 FROM learning_jobs j WHERE j.source_id = g.id AND j.state = 'done')""")
        recorded = psql(url, f"SELECT count(*) FROM generations WHERE id IN ({ids})")
        check(f"all {len(acknowledged)} acknowledged generations recorded", recorded == str(len(acknowledged)), recorded)
        check("no acknowledged job lost", lost == "0", lost)
        jobs, targets = psql(url, """SELECT count(*), COALESCE(sum((SELECT count(*) FROM unnest(j.learnable) WITH ORDINALITY AS x(l, i)
                                                    WHERE l AND i > 1)), 0)
                                     FROM learning_jobs j JOIN users u ON u.id = j.user_id
                                     WHERE u.name = 'crash' AND j.state = 'done'""").split("|")
        check("jobs_applied equals the jobs recorded", m["jobs_applied"] == int(jobs), f"{m['jobs_applied']} vs {jobs}")
        for level in m["levels"]:
            check(f"after the crash, level {level['name']} counted each recorded job once",
                  level["tokens"] == int(targets), f"{level['tokens']} vs {targets}")
        print(f"     {len(acknowledged)} acknowledged, {errors} cut off by the kill, {jobs} jobs recorded and applied", flush=True)
    finally:
        for r in reversed(replicas):
            r.stop()
        # The private PostgreSQL outlives a killed owner: stop it here.
        pgdata = os.path.join(workdir, "postgres")
        pg_ctl = next(iter(sorted(__import__("glob").glob("/usr/lib/postgresql/*/bin/pg_ctl"))), shutil.which("pg_ctl"))
        if pg_ctl and os.path.exists(os.path.join(pgdata, "postmaster.pid")):
            runas = ["/usr/sbin/runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
            subprocess.run(runas + [pg_ctl, "stop", "-D", pgdata, "-m", "fast"], capture_output=True)
        if failures:
            print(f"logs kept in {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'FAILED' if failures else 'passed'}: service durability ({len(failures)} failures)", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
