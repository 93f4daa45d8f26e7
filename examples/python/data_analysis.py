"""Data analysis in a sandbox: upload a CSV, run an analysis there, read back a chart.

The base image has Python but no plotting library, so the analysis draws its bar chart as SVG
with the standard library; with an image that has matplotlib, `plt.savefig("chart.svg")` does
the same. Run it against a local daemon:

    MOAT_API_KEY=moat_… python3 examples/python/data_analysis.py [OUT_DIR]

It writes OUT_DIR/chart.svg (default: the current directory).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from moat import Client

GROUP = os.environ.get("MOAT_EXAMPLE_GROUP", "examples")

CSV = """month,region,revenue
2026-01,north,120
2026-01,south,95
2026-02,north,135
2026-02,south,101
2026-03,north,128
2026-03,south,143
2026-04,north,150
2026-04,south,139
"""

# Runs inside the sandbox: the untrusted part, as if a model had written it.
ANALYSIS = r'''
import csv, json
from collections import defaultdict

by_month = defaultdict(int)
by_region = defaultdict(int)
with open("/work/sales.csv") as f:
    for row in csv.DictReader(f):
        by_month[row["month"]] += int(row["revenue"])
        by_region[row["region"]] += int(row["revenue"])

months = sorted(by_month)
top = max(by_month.values())
w, h, bar = 480, 260, 80
parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">',
         '<rect width="100%" height="100%" fill="white"/>',
         '<text x="20" y="24" font-family="sans-serif" font-size="16">Revenue by month</text>']
for i, m in enumerate(months):
    bh = by_month[m] / top * (h - 80)
    x = 40 + i * (bar + 30)
    parts.append(f'<rect x="{x}" y="{h - 30 - bh:.1f}" width="{bar}" height="{bh:.1f}" fill="#1f5fbf"/>')
    parts.append(f'<text x="{x + bar / 2}" y="{h - 12}" text-anchor="middle" font-family="sans-serif" font-size="12">{m}</text>')
    parts.append(f'<text x="{x + bar / 2}" y="{h - 36 - bh:.1f}" text-anchor="middle" font-family="sans-serif" font-size="12">{by_month[m]}</text>')
parts.append("</svg>")
open("/work/chart.svg", "w").write("\n".join(parts))
print(json.dumps({"months": len(months), "total": sum(by_month.values()), "by_region": by_region}))
'''


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    client = Client()
    client.groups.apply(GROUP, {"tier": "s"})
    with client.sandboxes.create(GROUP, labels={"example": "data-analysis"}) as sb:
        sb.files.write("/work/sales.csv", CSV.encode(), parents=True)
        result = sb.exec(["python3", "-"], stdin=ANALYSIS, timeout=60)
        if result.exit_code != 0:
            raise SystemExit(f"the analysis failed ({result.exit_code}):\n{result.stderr}")
        summary = json.loads(result.stdout)
        svg = sb.files.read("/work/chart.svg")
    out.mkdir(parents=True, exist_ok=True)
    (out / "chart.svg").write_bytes(svg)
    print(f"summary: {json.dumps(summary, sort_keys=True)}")
    print(f"chart: {out / 'chart.svg'} ({len(svg)} bytes)")


if __name__ == "__main__":
    main()
