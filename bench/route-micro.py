#!/usr/bin/env python3
"""What one `ROUTE` call costs Redis, in isolation (issue 14).

Starts a `redis-server` of its own, gives 1,000 users one connection each,
and calls the `ROUTE` script (read from src/redis/lua.rs) 20,000 times with
1 and with 8 messages of 150 bytes per call, pipelined; prints Redis's own
time per call (`INFO commandstats`). Variants cut the script short or take
a part out, to see what each part costs:

    python3 bench/route-micro.py                  # every variant
    python3 bench/route-micro.py route 'return 1' # some

Needs Python's `redis` package (`pip install redis`). Runs take a second
each; repeat them: single runs vary by ±15 % here.
"""
import os
import re
import socket
import subprocess
import sys
import time

import redis

SRC = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "redis", "lua.rs")).read()
LIB = re.search(r'macro_rules! history_lib \{\s*\(\) => \{\s*r#"(.*?)"#', SRC, re.S).group(1)
BODY = re.search(r'pub const ROUTE: &str = concat!\(\s*history_lib!\(\),\s*r#"(.*?)"#', SRC, re.S).group(1)
ROUTE = LIB + BODY


def cut(old, new):
    assert old in ROUTE, old
    return ROUTE.replace(old, new, 1)


VARIANTS = {
    "route": ROUTE,
    "return 1": "return 1",
    "return after HGETALL": cut("local size = tonumber(ARGV[2])", "if true then return {conns, {1}, 'e'} end\nlocal size = tonumber(ARGV[2])"),
    "return after position": cut("  lasts[pre] = parse_last(l)\nend", "  lasts[pre] = parse_last(l)\nend\nif true then return {conns, {1}, 'e'} end"),
    "return after the loop": cut("settle()\nif added then", "settle()\nif true then return {conns, res, epoch} end\nif added then"),
    "without the history XADD": cut("local r = redis.pcall('XADD'", "local r = 1 or redis.pcall('XADD'"),
    "without either PEXPIRE": ROUTE.replace("  redis.call('PEXPIRE', KEYS[sk], ttl)\n", "").replace("  redis.call('PEXPIRE', KEYS[3], ARGV[3])\n", ""),
}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def run(name, script, per_call, calls, users=1000):
    port = free_port()
    srv = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port)
        for _ in range(50):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        for u in range(users):
            r.hset(f"u:{{{u}}}", "c1", "node-1")
        sha = r.script_load(script)
        r.config_resetstat()
        n = 0
        pipe = r.pipeline(transaction=False)
        for c in range(calls):
            u = c % users
            # candidate epoch, history size, history ttl, seq ttl, idem ttl, n
            args = ["e" * 22, 200, 300_000, 86_400_000, 60_000, per_call]
            for m in range(per_call):
                n += 1
                follows = 4 if m > 0 else 0
                args += [f"1796301314169-{n}", 8 * 2 * 2 + follows, "to", f"user{u}", "payload", "x" * 150]
            pipe.evalsha(sha, 3, f"u:{{{u}}}", f"s:{{{u}}}", f"h:{{{u}}}", *args)
            if len(pipe) >= 200:
                pipe.execute()
        pipe.execute()
        e = r.info("commandstats")["cmdstat_evalsha"]
        us = e["usec_per_call"]
        print(f"{name:28s} {per_call} msg/call: {us:6.1f} µs per call, {us / per_call:5.1f} µs per message")
    finally:
        srv.terminate()
        srv.wait()


# PER_CALL="1 8 16" and MESSAGES=20000 (per run) by environment.
for name in sys.argv[1:] or VARIANTS:
    for per_call in map(int, os.environ.get("PER_CALL", "1 8").split()):
        run(name, VARIANTS[name], per_call, int(os.environ.get("MESSAGES", "20000")) // per_call)
