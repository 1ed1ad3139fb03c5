# SPDX-License-Identifier: Apache-2.0
"""A sandboxed program with `--gateway` trying every other way out.

usage: net.py HOST_PORT UPSTREAM_PORT OTHER_ADDRESS UNIX_PATH ABSTRACT_NAME
Prints {attempt: "connected" | "ExceptionName: why"} as JSON; only "gateway"
may connect.
"""
import json
import os
import socket
import sys
import urllib.parse

host_port, upstream_port, other, unix_path, abstract = sys.argv[1:6]
gateway = urllib.parse.urlsplit(os.environ["OPENAI_BASE_URL"])
results = {}


def attempt(name, fn):
    try:
        fn()
        results[name] = "connected"
    except Exception as e:
        results[name] = "%s: %s" % (type(e).__name__, e)


def tcp(host, port):
    socket.create_connection((host, int(port)), timeout=3).close()


def unix(address):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(address)
    s.close()


def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", ("127.0.0.1", int(host_port)))


def listen():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()


attempt("gateway", lambda: tcp(gateway.hostname, gateway.port))
attempt("host loopback listener", lambda: tcp("127.0.0.1", host_port))
attempt("upstream", lambda: tcp("127.0.0.1", upstream_port))
attempt("other address", lambda: tcp(other, host_port))
attempt("ipv6 loopback", lambda: tcp("::1", host_port))
attempt("unix path", lambda: unix(unix_path))
attempt("abstract socket", lambda: unix("\0" + abstract))
attempt("udp", udp)
attempt("listen", listen)
print(json.dumps(results))
