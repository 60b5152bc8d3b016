#!/usr/bin/env python3
"""The official `openai` Python client (PyPI) against `continuum serve`.

Run by `make test` (which installs the pinned client) as
    scripts/openai-client-check.py .build/debug/continuum

Starts the server the zero-config way (private PostgreSQL in a scratch data
directory, dev tenant and key printed once), then lists models, completes,
chats, streams with usage, learns for a `user` with the extension field
`wait_for_learning`, and checks the client's typed errors. Greedy texts are
compared with `continuum generate` on the bare backbone. Exits non-zero on
failure.
"""
import json
import os
import subprocess
import sys
import urllib.request

import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from continuum_serve import ZeroConfigServer  # noqa: E402

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/debug/continuum")
failures = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else ": " + str(detail)), flush=True)
    if not ok:
        failures.append(name)


def cli_generate(prompt, max_tokens, chat=False):
    args = [BIN, "generate", "--prompt", prompt, "--temperature", "0", "--max-tokens", str(max_tokens)]
    return subprocess.run(args + (["--chat"] if chat else []), check=True, capture_output=True, text=True).stdout


def main():
    with ZeroConfigServer(BIN, prefix="continuum-openai-") as server:
        run(server)
    print(f"{'FAILED' if failures else 'passed'}: openai client ({len(failures)} failures)", flush=True)
    sys.exit(1 if failures else 0)


def run(server):
    port, key, datadir = server.port, server.key, server.workdir + "/data"
    server.keep = True   # until every check has passed
    check("zero-config serve printed one API key", key is not None and key.startswith("ck-"), key)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)

    models = client.models.list()
    check("models.list", [m.id for m in models.data] == ["continuum"], models)

    prompt = "The capital of France is"
    c = client.completions.create(model="continuum", prompt=prompt, max_tokens=8, temperature=0)
    check("completions.create equals continuum generate", c.choices[0].text == cli_generate(prompt, 8),
          repr(c.choices[0].text))
    check("completion usage", c.usage.prompt_tokens == 5 and c.usage.completion_tokens == 8, c.usage)

    question = "What is the capital of France?"
    chat = client.chat.completions.create(model="continuum", messages=[{"role": "user", "content": question}],
                                          max_tokens=12, temperature=0)
    expected = cli_generate(question, 12, chat=True)
    check("chat.completions.create equals continuum generate --chat", chat.choices[0].message.content == expected,
          repr(chat.choices[0].message.content))
    check("chat message role", chat.choices[0].message.role == "assistant")

    stream = client.chat.completions.create(model="continuum", messages=[{"role": "user", "content": question}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    check("streamed chat equals the non-streamed text", text == expected, repr(text))
    check("stream finish_reason and usage", finish in ("stop", "length") and usage is not None
          and usage.completion_tokens == chat.usage.completion_tokens, (finish, usage))

    s = client.completions.create(model="continuum", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    check("streamed completion", "".join(ch.choices[0].text for ch in s if ch.choices) == cli_generate(prompt, 8))

    # A user's memory through the OpenAI API: wait_for_learning as an extension field.
    for i in range(3):
        client.chat.completions.create(
            model="continuum", user="carol", max_tokens=2, temperature=0,
            messages=[{"role": "user", "content": f"My favourite colour is teal, note {i}."}],
            extra_body={"wait_for_learning": True})
    memory = urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/users/carol/memory", headers={"Authorization": f"Bearer {key}"}))
    m = json.loads(memory.read())
    check("the user's chat turns were learned before the responses", m["jobs_applied"] == 3 and m["queued_jobs"] == 0
          and all(level["tokens"] > 0 for level in m["levels"]), m)

    # The drift audit of that user, on demand, then from the CLI against the same database.
    audit = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/users/carol/audit", data=b"", method="POST",
        headers={"Authorization": f"Bearer {key}"})).read())
    check("audit report of the user", audit["audited_version"] == m["version"] and audit["metrics"]["probe_positions"] > 100
          and 0 <= audit["metrics"]["top1_agreement"] <= 1, audit.get("metrics"))
    table = subprocess.run([BIN, "audit", "--tenant", "dev", "--data-dir", datadir], capture_output=True, text=True)
    rows = table.stdout.splitlines()
    check("continuum audit prints the ranking", table.returncode == 0 and rows[0].split()[:3] == ["rank", "user", "version"]
          and rows[1].split()[1] == "carol", table.stdout + table.stderr)

    try:
        client.completions.create(model="gpt-4", prompt=prompt, max_tokens=4)
        check("unknown model raises NotFoundError", False, "no error")
    except openai.NotFoundError as e:
        check("unknown model raises NotFoundError", e.body.get("code") == "model_not_found", e.body)
    try:
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="ck-wrong", max_retries=0).models.list()
        check("a wrong key raises AuthenticationError", False, "no error")
    except openai.AuthenticationError:
        check("a wrong key raises AuthenticationError", True)
    try:
        client.completions.create(model="continuum", prompt=prompt, max_tokens=4, temperature=7)
        check("an out-of-range temperature raises BadRequestError", False, "no error")
    except openai.BadRequestError as e:
        check("an out-of-range temperature raises BadRequestError", e.body.get("param") == "temperature", e.body)
    if failures:
        print(f"logs kept in {server.workdir}")
    else:
        server.keep = False


if __name__ == "__main__":
    main()
