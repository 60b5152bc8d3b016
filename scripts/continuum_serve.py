"""Starts `continuum serve` the zero-config way for the scripts that test it.

    with ZeroConfigServer(binary, extra_args) as server:
        server.base, server.key, server.log_path

A private PostgreSQL in a scratch data directory, the dev tenant's admin key
read from the first start's standard output, /readyz awaited; on exit the
server gets SIGINT (it drains and stops its PostgreSQL) and the scratch
directory is removed unless `keep` is set. Standard library only.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request


class ZeroConfigServer:
    def __init__(self, binary, args=(), prefix="continuum-", timeout=300):
        self.binary = os.path.abspath(binary)
        self.args = list(args)
        self.workdir = tempfile.mkdtemp(prefix=prefix)
        self.timeout = timeout
        self.keep = False
        self.process = None
        self.key = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.out_path = os.path.join(self.workdir, "serve.out")
        self.log_path = os.path.join(self.workdir, "serve.log")

    def __enter__(self):
        out = open(self.out_path, "w+")
        self.process = subprocess.Popen([self.binary, "serve", "--port", str(self.port), "--data-dir", self.workdir + "/data"]
                                        + self.args, stdout=out, stderr=open(self.log_path, "w"))
        deadline = time.time() + self.timeout
        while time.time() < deadline and self.key is None:
            if self.process.poll() is not None:
                raise SystemExit(f"continuum serve exited with {self.process.returncode}; see {self.log_path}")
            out.seek(0)
            self.key = next((l.split(": ", 1)[1].strip() for l in out if l.startswith("API key: ")), None)
            time.sleep(0.2)
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(self.base + "/readyz", timeout=2).status == 200:
                    return self
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"continuum serve did not become ready; see {self.log_path}")

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def stop(self):
        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def logs(self):
        """The server's log (standard error; standard output shows the first start's key, on purpose, once)."""
        return open(self.log_path).read()

    def __exit__(self, *exc):
        self.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return False
