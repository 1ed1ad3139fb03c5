# SPDX-License-Identifier: Apache-2.0
"""A sandboxed program using the official OpenAI or Anthropic SDK, unmodified,
through `agent-shim run --gateway`. Prints one JSON report on stdout.

usage: sdk.py MODE WORKDIR
  openai     chat completion, a streamed one, a path outside the gateway's allow
  anthropic  message, a streamed one
  uses       three chat completions (the token has two uses)
  leak       a streamed completion whose upstream leaks the key mid-stream
After the mode: everything the program can read that might hold the key (its
environment, its own and every visible process's environ and cmdline) goes in
the report, and every readable and writable region of every visible process's memory goes
to WORKDIR/memory for the test to search.
"""
import http.client
import json
import os
import sys
import urllib.parse

import time

mode, work = sys.argv[1], sys.argv[2]
report = {"mode": mode}
started = time.monotonic()


def step(name):
    sys.stderr.write("%.2f %s\n" % (time.monotonic() - started, name))


def marker(name):
    open(os.path.join(work, name), "w").close()


MESSAGES = [{"role": "user", "content": "hi"}]

if mode == "openai":
    import openai

    client = openai.OpenAI(max_retries=0)
    reply = client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    report["chat"] = reply.choices[0].message.content
    pieces = []
    for chunk in client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            if not pieces:
                marker("first-openai")
            pieces.append(chunk.choices[0].delta.content)
    report["stream"] = pieces
    try:
        client.models.list()
        report["models"] = "allowed"
    except openai.PermissionDeniedError as e:
        report["models"] = "denied: %s" % e
    # A dot segment the SDK would never send, straight on the wire.
    url = urllib.parse.urlsplit(os.environ["OPENAI_BASE_URL"])
    conn = http.client.HTTPConnection(url.hostname, url.port)
    conn.request("POST", url.path + "/chat/../chat/completions", body="{}",
                 headers={"content-type": "application/json"})
    answer = conn.getresponse()
    report["dot_segment"] = "%d %s" % (answer.status, answer.read().decode())
elif mode == "anthropic":
    import anthropic

    client = anthropic.Anthropic(max_retries=0)
    step("client")
    reply = client.messages.create(model="claude-test", max_tokens=16, messages=MESSAGES)
    step("message")
    report["chat"] = reply.content[0].text
    pieces = []
    with client.messages.stream(model="claude-test", max_tokens=16, messages=MESSAGES) as stream:
        for text in stream.text_stream:
            if not pieces:
                marker("first-anthropic")
            pieces.append(text)
    report["stream"] = pieces
    step("stream")
elif mode == "uses":
    import openai

    client = openai.OpenAI(max_retries=0)
    results = []
    for _ in range(3):
        try:
            client.chat.completions.create(model="gpt-test", messages=MESSAGES)
            results.append("ok")
        except openai.PermissionDeniedError as e:
            results.append("denied: %s" % e)
    report["uses"] = results
elif mode == "leak":
    url = urllib.parse.urlsplit(os.environ["OPENAI_BASE_URL"])
    conn = http.client.HTTPConnection(url.hostname, url.port)
    conn.request("POST", url.path + "/completions", body='{"stream": true}',
                 headers={"content-type": "application/json"})
    answer = conn.getresponse()
    lines = []
    try:
        while True:
            line = answer.readline()
            if not line:
                break
            lines.append(line.decode("utf-8", "replace"))
        report["ended"] = "complete"
    except Exception as e:  # the relay breaks the body off
        report["ended"] = "broken: %s" % type(e).__name__
    report["lines"] = lines

step("mode done")
# Everything readable that could hold the key.
report["env"] = dict(os.environ)
reachable = {}
memory = open(os.path.join(work, "memory"), "wb")
for pid in ["self"] + [p for p in os.listdir("/proc") if p.isdigit()]:
    for name in ["environ", "cmdline"]:
        path = "/proc/%s/%s" % (pid, name)
        try:
            reachable[path] = open(path, "rb").read().decode("latin1")
        except Exception as e:
            reachable[path] = "unreadable: %s" % type(e).__name__
    try:
        maps = open("/proc/%s/maps" % pid).read().splitlines()
        mem = open("/proc/%s/mem" % pid, "rb")
    except Exception as e:
        reachable["/proc/%s/mem" % pid] = "unreadable: %s" % type(e).__name__
        continue
    dumped = 0
    for line in maps:
        fields = line.split()
        # Readable and writable: where anything the process received lives.
        if not fields[1].startswith("rw"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        try:
            mem.seek(start)
            memory.write(mem.read(end - start))
            dumped += end - start
        except Exception:
            pass
    reachable["/proc/%s/mem" % pid] = "dumped %d bytes" % dumped
memory.close()
report["reachable"] = reachable
step("dumped")
print(json.dumps(report))
