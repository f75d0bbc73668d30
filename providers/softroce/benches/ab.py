#!/usr/bin/env python3
"""Interleaved A/B of softroce builds with the bundled tools (BENCHMARKS.md, "softroce
profile and tuning"): each round runs every test for every variant in turn, so a
changing machine load hits all variants alike; prints medians over the rounds.

Usage: ab.py NAME=DIR[:ENV=V,...] ...   (DIR holds fabric-rma-bw and fabric-pingpong)
  ROUNDS=5  TESTS=rma1M,pp1M,pp8  MODE=sleep (blocking waits; default: the tools' poll)
Example: ab.py base=/tmp/base new=target/release nogso=target/release:SOFTROCE_GSO=0
Each figure: (MB/s or median one-way us, CPU seconds of the process from wait4).
Every run gets its own 127.55.x.y address (--self), so 127.0.0.1:4791 may be taken."""
import subprocess, sys, statistics, os, re, time
rounds = int(os.environ.get("ROUNDS", "5"))
tests = os.environ.get("TESTS", "rma1M,pp1M,pp8").split(",")
variants = []
for a in sys.argv[1:]:
    name, rest = a.split("=", 1)
    d, _, env = rest.partition(":")
    e = dict(os.environ)
    for kv in filter(None, env.split(",")):
        k, v = kv.split("="); e[k] = v
    variants.append((name, d, e))
def run(d, e, t):
    if t == "rma1M":
        cmd = [d + "/fabric-rma-bw", "--self", "-s", "127.55.%d.%d" % (os.getpid() % 200 + 1, int(time.time()*1000) % 200 + 1), "-p", "softroce", "-S", "1M", "--no-verify"]
        rx = r"write\s+1M\s+\d+\s+([\d.]+)"
    elif t == "pp1M":
        cmd = [d + "/fabric-pingpong", "--self", "-s", "127.55.%d.%d" % (os.getpid() % 200 + 1, int(time.time()*1000) % 200 + 1), "-p", "softroce", "-S", "1M", "--no-verify"]
        rx = r"^\s+1M\s+\d+\s+[\d.]+\s+[\d.]+\s+([\d.]+)"
    elif t == "pp8":
        cmd = [d + "/fabric-pingpong", "--self", "-s", "127.55.%d.%d" % (os.getpid() % 200 + 1, int(time.time()*1000) % 200 + 1), "-p", "softroce", "-S", "8", "--no-verify"]
        rx = r"^\s+8\s+\d+\s+([\d.]+)"   # median one-way us
    mode = os.environ.get("MODE")
    if mode: cmd += ["-m", mode]
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, st, ru = os.wait4(p.pid, 0)
    m = re.search(rx, out, re.M)
    if not m: return None
    cpu = ru.ru_utime + ru.ru_stime
    return (float(m.group(1)), round(cpu, 2))
res = {(v[0], t): [] for v in variants for t in tests}
for r in range(rounds):
    for t in tests:
        for name, d, e in variants:
            res[(name, t)].append(run(d, e, t))
    print("round", r + 1, "load", open("/proc/loadavg").read().split()[:3], flush=True)
for t in tests:
    for name, _, _ in variants:
        v = [x[0] for x in res[(name, t)] if x is not None]
        c = [x[1] for x in res[(name, t)] if x is not None]
        med = statistics.median(v) if v else float("nan")
        cm = statistics.median(c) if c else float("nan")
        print(f"{t:6} {name:10} median {med:10.2f} cpu_s {cm:6.2f}  runs {res[(name, t)]}")
