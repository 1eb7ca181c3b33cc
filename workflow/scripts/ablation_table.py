"""The ablation's one table and one plot: zero-shot top-1 of each variant's run folder.

    ablation_table.py RUN_DIR... --out-md ablation.md --out-plot ablation.png --out-json ablation.json

A variant is named by its folder (results/ablation/<variant>); each holds eval.json from
`declip eval` and train_summary.json from `declip train`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TERMS = {
    "clip": "plain CLIP: one image view, one text view, contrastive loss only",
    "declip": "DeCLIP: MVS + NNS + SimSiam + MLM",
    "no_mvs": "DeCLIP without the EDA text view (MVS 2x2 -> 2x1 pairs)",
    "no_nns": "DeCLIP without nearest-neighbour supervision",
    "no_simsiam": "DeCLIP without image self-supervision (SimSiam)",
    "no_mlm": "DeCLIP without masked language modelling",
}


def read_rows(run_dirs: list[Path]) -> list[dict]:
    rows = []
    for run in run_dirs:
        ev = json.loads((run / "eval.json").read_text())
        summary = json.loads((run / "train_summary.json").read_text())
        rows.append(
            {
                "variant": run.name,
                "top1": float(ev["top1"]),
                "top5": float(ev["top5"]),
                "classes": int(ev["classes"]),
                "steps": int(summary["steps"]),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    chance = 100.0 / rows[0]["classes"]
    lines = [
        f"# Ablation on the demo world ({rows[0]['steps']} steps each, same seed)",
        "",
        f"Zero-shot accuracy over {rows[0]['classes']} classes (chance {chance:.1f}% top-1).",
        "",
        "| variant | objective | top-1 (%) | top-5 (%) |",
        "| --- | --- | ---: | ---: |",
    ]
    lines += [f"| {r['variant']} | {TERMS.get(r['variant'], '')} | {r['top1']:.2f} | {r['top5']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names, top1 = [r["variant"] for r in rows], [r["top1"] for r in rows]
    bars = ax.bar(names, top1, color=["#999999" if n == "clip" else "#3b6fb6" for n in names])
    ax.bar_label(bars, fmt="%.1f")
    ax.axhline(100.0 / rows[0]["classes"], color="#c0392b", linestyle="--", linewidth=1, label="chance")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title(f"Ablation, {rows[0]['steps']} steps each")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="variant run folders")
    parser.add_argument("--out-md", type=Path, required=True)
    parser.add_argument("--out-plot", type=Path, required=True)
    parser.add_argument("--out-json", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = read_rows(args.runs)
    if len({r["steps"] for r in rows}) != 1:
        print(
            f"error: variants trained for different steps: {[(r['variant'], r['steps']) for r in rows]}",
            file=sys.stderr,
        )
        return 1
    args.out_md.write_text(markdown(rows))
    plot(rows, args.out_plot)
    args.out_json.write_text(
        json.dumps({r["variant"]: {"top1": r["top1"], "top5": r["top5"]} for r in rows}, indent=2) + "\n"
    )
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
