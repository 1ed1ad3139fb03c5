# SPDX-License-Identifier: Apache-2.0
"""Time to first byte of streamed chat completions, for tests/benches/gateway.rs.

usage: ttfb.py URL RUNS WARMUP   (URL "-": $OPENAI_BASE_URL/chat/completions)
One keep-alive connection; for each request, the time from sending it to the
first line of the first event. Prints the samples (after WARMUP) in
microseconds, space-separated.
"""
import http.client
import json
import os
import sys
import time
import urllib.parse

target = sys.argv[1]
if target == "-":
    target = os.environ["OPENAI_BASE_URL"] + "/chat/completions"
url = urllib.parse.urlsplit(target)
runs, warmup = int(sys.argv[2]), int(sys.argv[3])
body = json.dumps({"model": "gpt-test", "stream": True,
                   "messages": [{"role": "user", "content": "hi"}]})
headers = {"content-type": "application/json", "authorization": "Bearer placeholder"}
conn = http.client.HTTPConnection(url.hostname, url.port)
samples = []
for i in range(warmup + runs):
    started = time.perf_counter()
    conn.request("POST", url.path, body=body, headers=headers)
    answer = conn.getresponse()
    first = answer.readline()
    took = time.perf_counter() - started
    assert first.startswith(b"data: "), first
    answer.read()
    if i >= warmup:
        samples.append(took)
print(" ".join("%d" % (s * 1e6) for s in samples))
