"""What guidance trades, as a picture: a bench_pipeline.py JSON drawn as accuracy, recall and FD against scale.

    .venv/bin/python benchmarks/plot_pipeline.py benchmarks/results/pipeline_fashion.json [--out PNG]

Left: classifier-free guidance scale w (cfg_sweep). Right: classifier guidance scale s on the unconditional path
(classifier_guidance_w0), when the JSON has it. Accuracy and recall share the left axis; FD (with the real-image
floor dotted) has its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _panel(ax, rows: dict, xlabel: str, title: str) -> None:
    xs = sorted(rows, key=float)
    x = [float(k) for k in xs]
    acc = [rows[k]["accuracy"] for k in xs]
    rec = [rows[k]["recall"] for k in xs]
    fd = [rows[k]["fd"] for k in xs]
    ax.plot(x, acc, "o-", color="tab:blue", label="accuracy")
    ax.plot(x, rec, "s-", color="tab:green", label="recall")
    ax.axhline(rows[xs[0]]["accuracy_floor"], color="tab:blue", ls=":", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot(x, fd, "^--", color="tab:red", label="FD")
    ax2.axhline(rows[xs[0]]["fd_floor"], color="tab:red", ls=":", lw=1)
    ax2.set_ylabel("feature-space FD (lower is better)", color="tab:red")
    lines = ax.get_lines()[:2] + ax2.get_lines()[:1]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--out", default=None, help="PNG path (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = json.loads(Path(args.json).read_text())
    if "cfg_sweep" not in res:
        raise SystemExit(f"{args.json} has no cfg_sweep; run bench_pipeline.py with the cfg section")
    panels = [("cfg_sweep", "CFG scale w (1 = conditional)", "classifier-free guidance")]
    if res.get("classifier_guidance_w0"):
        panels.append(("classifier_guidance_w0", "classifier scale s (w = 0)", "classifier guidance"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, xlabel, title) in zip(axes[0], panels):
        _panel(ax, res[key], xlabel, title)
    fig.suptitle(f"{res.get('pipeline', '')}: {res.get('sampler', '')} {res.get('steps', '')} steps, "
                 f"eval classifier {res.get('eval_classifier_sha256', '')}", fontsize=9)
    fig.tight_layout()
    out = Path(args.out) if args.out else Path(args.json).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
