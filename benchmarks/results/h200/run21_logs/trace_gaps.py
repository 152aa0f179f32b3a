"""GPU time between kernels in a profiler trace (run locally on call 1's trace_mha_b64_rank0.json.gz):
    python3 trace_gaps.py TRACE.json.gz"""
import collections
import gzip
import json
import statistics
import sys

trace = json.load(gzip.open(sys.argv[1]))
GPU = ("kernel", "gpu_memcpy", "gpu_memset")
events = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in GPU), key=lambda e: e["ts"])
print(len(events), "GPU events", dict(collections.Counter(e["cat"] for e in events)),
      "streams", len({(e["pid"], e["tid"]) for e in events}))
gaps = [(b["ts"] - (a["ts"] + a["dur"]), a["name"][:50], b["name"][:50]) for a, b in zip(events, events[1:])]
span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
busy, idle = sum(e["dur"] for e in events), sum(g for g, _, _ in gaps if g > 0)
print(f"span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, idle {idle / 1e3:.2f} ms")
for g, a, b in sorted(gaps, reverse=True)[:6]:
    print(f"  {g / 1e3:8.3f} ms  {a} -> {b}")
small = [g for g, _, _ in gaps if 0 < g < 50]
print(f"gaps under 50 us: {len(small)}, {sum(small) / 1e3:.2f} ms in all, median {statistics.median(small):.2f} us")
starts = [e["ts"] for e in events if e["name"].startswith("Memcpy HtoD")][::2]  # each step copies inputs, then targets
print("step starts apart (ms):", [round((b - a) / 1e3, 2) for a, b in zip(starts, starts[1:])])
