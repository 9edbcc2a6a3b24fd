"""Summary of bench/serve_load.sh's output directory: prints the BENCHMARKS.md table and
writes summary.json beside the raw files."""
import json
import re
import statistics
import sys
from pathlib import Path

o = Path(sys.argv[1])
rows = [l.split() for l in (o / "clients.txt").read_text().splitlines()]
levels = dict(
    (l.split()[0], int(l.split()[2])) for l in (o / "levels.txt").read_text().splitlines()
)


def pct(xs, p):
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def peak_kb(path):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", (o / path).read_text())
    return int(m.group(1)) if m else None


out = {"cpu": (o / "cpu.txt").read_text().strip(), "levels": {}, "batch": {}, "one_shot": {}}
for conc in (1, 4):
    lat = [int(r[1]) / 1000 for r in rows if r[0].startswith(f"c{conc}-")]
    rss = [int(r[2]) for r in rows if r[0].startswith(f"c{conc}-")]
    wall = levels[f"c{conc}"] / 1000
    out["levels"][conc] = {
        "sessions": len(lat),
        "wall_s": wall,
        "sessions_per_min": 60 * len(lat) / wall,
        "p50_s": statistics.median(lat),
        "p95_s": pct(lat, 95),
        "client_peak_rss_mib": max(rss) / 1024,
    }
sessions = [json.loads(l) for l in (o / "sessions.jsonl").read_text().splitlines()]
setup = [s["setup_s"] for s in sessions if s["ok"]]
out["server_setup_s_median"] = statistics.median(setup)
out["failed_sessions"] = sum(1 for s in sessions if not s["ok"])
out["serve_peak_rss_mib"] = peak_kb("serve.time") / 1024
out["dealer_peak_rss_mib"] = peak_kb("dealer.time") / 1024
for b in (1, 8, 32):
    j = json.loads((o / f"batch{b}.json").read_text())
    wall = [int(r[1]) / 1000 for r in rows if r[0] == f"batch{b}"][0]
    out["batch"][b] = {
        "n": j["n"],
        "shapes": j["shapes"],
        "client_wall_s": wall,
        "per_example_s": wall / j["n"],
        "online_offline_per_example_s": (j["online_s"] + j["offline_s"]) / j["n"],
        "setup_s": j["setup_s"],
    }
runs = [r for r in rows if r[0].startswith("run")]
out["one_shot"] = {
    "wall_s": [int(r[1]) / 1000 for r in runs],
    "peak_rss_mib": max(int(r[2]) for r in runs) / 1024,
}
(o / "summary.json").write_text(json.dumps(out, indent=2))

print(out["cpu"])
print("| path | clients at once | sessions | sessions/min | p50 s | p95 s |")
print("|---|---|---|---|---|---|")
for conc, v in out["levels"].items():
    print(f"| `mpc serve` + `mpc client` | {conc} | {v['sessions']} | {v['sessions_per_min']:.1f} | "
          f"{v['p50_s']:.2f} | {v['p95_s']:.2f} |")
w = out["one_shot"]["wall_s"]
print(f"| `mpc run` (one shot) | 1 | {len(w)} | {60 * len(w) / sum(w):.1f} | "
      f"{statistics.median(w):.2f} | {max(w):.2f} |")
print()
print(f"peak RSS MiB: serve {out['serve_peak_rss_mib']:.0f}, dealer {out['dealer_peak_rss_mib']:.0f}, "
      f"client {max(v['client_peak_rss_mib'] for v in out['levels'].values()):.0f}, "
      f"mpc run {out['one_shot']['peak_rss_mib']:.0f}; server setup per session "
      f"{out['server_setup_s_median']:.2f} s (median); failed sessions {out['failed_sessions']}")
print()
print("| batch | shapes | client wall s | per example s | online + offline per example s |")
print("|---|---|---|---|---|")
for b, v in out["batch"].items():
    print(f"| {b} | {v['shapes']} | {v['client_wall_s']:.2f} | {v['per_example_s']:.3f} | "
          f"{v['online_offline_per_example_s']:.3f} |")
