#!/usr/bin/env python3
"""Property-based API check: schemathesis (pinned, PyPI) against `continuum serve`.

Run by `make test` (which installs the pinned schemathesis into .venv-api) as
    scripts/api-fuzz.py .build/debug/continuum [--max-time SECONDS]

Starts the server the zero-config way (private PostgreSQL in a scratch data
directory, dev tenant and admin key printed once) with small levels and
limits so that learning, audits and consolidation are cheap, then lets
schemathesis generate requests from openapi.yaml for every operation (its
examples, coverage, fuzzing and stateful phases, bounded by --max-time) with
these checks:
  not_a_server_error        no 5xx, ever
  status_code_conformance   every status is documented for its operation
  content_type_conformance  responses have a documented media type
  response_headers_conformance, response_schema_conformance
                            responses match the documented headers and schemas
  ignored_auth              a request without a key is refused (401)
  unsupported_method, allow_header_conformance
                            undocumented methods get 405 with a correct Allow
Afterwards /healthz must answer, the server process must still be running,
and its log must contain no key material. Prints schemathesis' summary line;
exits non-zero on any failure.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from continuum_serve import ZeroConfigServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
          "response_schema_conformance", "ignored_auth", "unsupported_method", "allow_header_conformance"]

# Levels small enough that learning, an audit and a consolidation take a fraction of a second.
LEVELS = {"levels": [{"name": "mid", "chunk_size": 32, "width": 4, "layers": [28, 29], "learning_rate": 0.003},
                     {"name": "fast", "chunk_size": 8, "width": 4, "layers": [28, 29], "learning_rate": 0.01}],
          "min_surprise": 0}
CONFIG = {"max_tokens": 16, "max_prompt_tokens": 512, "max_consolidation_steps": 2, "audit_reference_tokens": 32,
          "audit_personal_tokens": 16, "audits_per_user_per_minute": 30, "learning_wait_seconds": 10}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default=".build/debug/continuum")
    ap.add_argument("--max-time", type=int, default=180, help="schemathesis' time budget in seconds")
    ap.add_argument("--schemathesis", default=os.path.join(ROOT, ".venv-api", "bin", "schemathesis"))
    args = ap.parse_args()
    failures = []

    def check(name, ok, detail=""):
        print(("ok   " if ok else "FAIL ") + name + ("" if ok else ": " + str(detail)), flush=True)
        if not ok:
            failures.append(name)

    settings = tempfile.mkdtemp(prefix="continuum-api-fuzz-settings-")
    with open(os.path.join(settings, "levels.json"), "w") as f:
        json.dump(LEVELS, f)
    with open(os.path.join(settings, "service.json"), "w") as f:
        json.dump(CONFIG, f)
    server = ZeroConfigServer(args.binary, ["--levels", settings + "/levels.json", "--config", settings + "/service.json",
                                            "--log-level", "debug"], prefix="continuum-api-fuzz-")
    with server:
        server.keep = True   # until every check has passed
        key, base = server.key, server.base
        check("zero-config serve printed an admin key", key is not None and key.startswith("ck-"), key)
        # A user with some history, so that stateful and example requests find something.
        req = urllib.request.Request(base + "/v1/generate", method="POST",
                                     data=json.dumps({"user": "alice", "prompt": "My cat is called Zorblax.", "max_tokens": 4,
                                                      "wait_for_learning": True}).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=120).read()

        started = time.time()
        cmd = [args.schemathesis, "run", os.path.join(ROOT, "openapi.yaml"), "--url", base,
               "-H", f"Authorization: Bearer {key}", "--checks", ",".join(CHECKS), "--max-time", str(args.max_time),
               "--workers", "2", "--request-timeout", "120", "--continue-on-failure", "--no-color",
               "--suppress-health-check", "all", "--seed", "20261201"]
        print("schemathesis run … --checks " + ",".join(CHECKS) + f" --max-time {args.max_time}", flush=True)
        # In the scratch directory: schemathesis keeps a cache of its findings in the working directory.
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=server.workdir, env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
        # Never print the key: it is in the command line schemathesis echoes in reproduction commands.
        report = (run.stdout + run.stderr).replace(key, "ck-…")
        with open(os.path.join(server.workdir, "schemathesis.txt"), "w") as f:
            f.write(report)
        print(report[-6000:], flush=True)
        summary = [l for l in report.splitlines() if re.search(r"\d+ (passed|failed)", l) or "test cases" in l]
        print("schemathesis summary: " + (summary[-1].strip() if summary else "(none)"), f"({time.time() - started:.0f} s)")
        check("schemathesis: no failures", run.returncode == 0,
              f"exit {run.returncode}; full report in {server.workdir}/schemathesis.txt")
        check("the server is still running", server.alive())
        try:
            health = urllib.request.urlopen(base + "/healthz", timeout=10).status
        except OSError as e:
            health = e
        check("/healthz answers after the run", health == 200, health)
        server.stop()
        log = server.logs()
        check("the server's log holds no key material", key[11:] not in log and "Bearer" not in log)
        check("the server's log is not empty (debug level)", len(log) > 0)
        if not failures:
            server.keep = False
    shutil.rmtree(settings, ignore_errors=True)
    print("api fuzz:", "0 failures" if not failures else f"{len(failures)} failures: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
