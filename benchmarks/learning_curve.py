"""Score against wall-clock minutes of training for curriculum runs made by `mogao.demo` (`make demo`,
`make demo-long`): one point per finished stage, at the cumulative training time of that stage's end (the last
`time` of each stage's `metrics.jsonl`), with the scores of the report's eval table (`report.json`).

    python benchmarks/learning_curve.py runs/demo runs/demo-long --out benchmarks/learning_curve.png

Prints a Markdown table (run, stage, minutes, every score) and writes the plot: one panel per capability, one
line per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def stage_points(run: Path) -> list[dict]:
    """[{stage, minutes, scores}] for the stages of `run` that the report scored, in order."""
    report = json.loads((run / "report.json").read_text())
    points, total = [], 0.0
    for i, st in enumerate(report["stages"], start=1):
        rows = [json.loads(line) for line in (run / f"{i}-{st['stage']}" / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        times = [r["time"] for r in rows if r.get("kind") == "train" and "time" in r]
        total += max(times, default=0.0)
        points.append({"stage": st["stage"], "minutes": total / 60, "scores": st["scores"]})
    return points


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories holding report.json")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/learning_curve.png"))
    args = ap.parse_args(argv)
    curves = {str(r): stage_points(r) for r in args.runs}
    names = list(next(iter(curves.values()))[0]["scores"])
    print("| run | stage | training min | " + " | ".join(names) + " |")
    print("|---|---|---:|" + "---:|" * len(names))
    for run, pts in curves.items():
        for p in pts:
            cells = " | ".join("–" if p["scores"][k] is None else f"{p['scores'][k]:.2f}" for k in names)
            print(f"| {run} | {p['stage']} | {p['minutes']:.1f} | {cells} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for j, (run, pts) in enumerate(curves.items()):
            xs = [0.0] + [p["minutes"] for p in pts]
            ys = [0.0] + [p["scores"][name] or 0.0 for p in pts]
            ax.plot(xs, ys, marker="o", color=f"C{j}", label=Path(run).name)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("training minutes (2 CPU cores)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
