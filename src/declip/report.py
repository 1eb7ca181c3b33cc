"""`declip report`: one page per set of runs, beside the seed's published numbers, in Markdown and HTML.

Everything comes from the run folders (`train_summary.json`, `metrics.jsonl`, `config.yaml`,
`eval.json`, `data_check.json`), so a report works with MLflow down. With a tracking URI that
answers, the folders' final metrics are cross-checked against the MLflow runs and the report
folder is logged there as artifacts; MLflow problems become notes, never failures.

The page is built once as a list of blocks and rendered twice: `report.md` links `plots/*.png`,
`report.html` is self-contained (inline CSS, PNGs as base64 data URIs, no scripts, no external
resources) and escapes every string that came from a file, so a caption such as
`<script>...</script>` shows as text.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from declip.errors import InputError
from declip.tracking import RUN_ID_FILE, UNSYNCED_FILE, read_metrics
from declip.train.checkpoint import atomic_write

# The seed's published table (Ascend port on Ascend 910, YFCC15M, ViT-B/32 DeCLIP).
SEED_ROWS = [
    {"run": "seed (Ascend 910)", "device": "npu", "top1": None, "fps": 85.0, "devices": 1, "steps": 100},
    {"run": "seed (Ascend 910)", "device": "npu", "top1": 32.91, "fps": 680.0, "devices": 8, "steps": 128000},
]
LOSS_KEYS = ("loss", "mvs", "nns", "simsiam", "mlm")
# plot file stem -> (title, y label, metric keys)
PLOTS = {
    "loss": ("Training loss: total and terms", "loss", LOSS_KEYS),
    "lr": ("Learning rate", "lr", ("lr",)),
    "logit_scale": ("Logit scale exp(t)", "scale", ("logit_scale",)),
    "fps": ("Throughput", "samples/s (global)", ("fps",)),
    "zeroshot_top1": ("Zero-shot top-1", "top-1 (%)", ("zeroshot_top1",)),
}


@dataclass
class Run:
    """What one run folder holds; absent files are None (or empty)."""

    path: Path
    label: str
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    config_text: str | None
    config: dict[str, Any]
    eval: dict[str, Any] | None
    data_check: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, the last value per step (a rollback re-logs steps), sorted."""
        by_step: dict[int, float] = {}
        for row in self.metrics:
            v = row.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v) and "step" in row:
                by_step[int(row["step"])] = float(v)
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def last_values(self) -> dict[str, float]:
        """Each metric's value at its highest logged step."""
        keys = {k for row in self.metrics for k in row if k != "step"}
        out = {}
        for k in sorted(keys):
            steps, values = self.series(k)
            if steps:
                out[k] = values[-1]
        return out

    @property
    def top1(self) -> float | None:
        """eval.json's top-1, else the last in-training evaluation."""
        if self.eval and isinstance(self.eval.get("top1"), (int, float)):
            return float(self.eval["top1"])
        _, values = self.series("zeroshot_top1")
        return values[-1] if values else None


def _read_json(path: Path, run_notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        run_notes.append(f"{path.name} is not valid JSON ({e}); ignored")
        return None


def load_run(path: Path) -> Run:
    """Read a run folder (only the files it has); an empty or missing folder is an InputError."""
    path = Path(path)
    known = ("train_summary.json", "metrics.jsonl", "config.yaml", "eval.json")
    if not path.is_dir() or not any((path / name).is_file() for name in known):
        raise InputError(f"{path}: not a run folder (none of {', '.join(known)} found)")
    notes: list[str] = []
    summary = _read_json(path / "train_summary.json", notes)
    config_text = (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else None
    try:
        config = yaml.safe_load(config_text or "") or {}
    except yaml.YAMLError as e:
        notes.append(f"config.yaml is not valid YAML ({e})")
        config = {}
    name = (summary or {}).get("name") or (config.get("name") if isinstance(config, dict) else None) or path.name
    return Run(
        path=path,
        label=str(name),
        summary=summary,
        metrics=read_metrics(path),
        config_text=config_text,
        config=config if isinstance(config, dict) else {},
        eval=_read_json(path / "eval.json", notes),
        data_check=_read_json(path / "data_check.json", notes),
        notes=notes,
    )


# ---------------------------------------------------------------- plots


def plot_runs(runs: list[Run], plots_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """One PNG per entry of PLOTS with data in any run; returns ({stem: path}, skipped notes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    made, skipped = {}, []
    styles = ["-", "--", ":", "-."]
    for stem, (title, ylabel, keys) in PLOTS.items():
        lines = [(run, i, key, *run.series(key)) for i, run in enumerate(runs) for key in keys]
        lines = [line for line in lines if line[3]]
        evals = [(r, r.eval) for r in runs if stem == "zeroshot_top1" and r.eval and "top1" in r.eval]
        if not lines and not evals:
            skipped.append(f"{stem}: no `{'`, `'.join(keys)}` values in metrics.jsonl")
            continue
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
        for run, i, key, steps, values in lines:
            label = run.label if len(keys) == 1 else f"{run.label}: {key}"
            kw = {"marker": "o", "markersize": 3} if len(steps) < 30 else {}
            ax.plot(steps, values, styles[i % len(styles)], label=label, linewidth=1.4, **kw)
        for run, result in evals:
            ax.plot([result.get("step", 0)], [result["top1"]], "*", markersize=12, label=f"{run.label}: eval.json")
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if stem == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path = plots_dir / f"{stem}.png"
        atomic_write(path, lambda f: f.write(buf.getbuffer()))  # noqa: B023 - called right here
        made[stem] = path
    return made, skipped


# ---------------------------------------------------------------- MLflow (best effort)


def crosscheck_mlflow(runs: list[Run], uri: str) -> list[str]:
    """Compare each folder's last metric values with its MLflow run; notes for the report."""
    from declip.tracking import _client, reachable

    if not reachable(uri):
        return [f"MLflow at {uri} is unreachable: not cross-checked; the report was not logged there."]
    notes = []
    try:
        client = _client(uri)
    except Exception as e:  # noqa: BLE001 - MLflow never fails a report
        return [f"MLflow at {uri}: client failed ({type(e).__name__}: {e})"]
    for run in runs:
        id_file = run.path / RUN_ID_FILE
        if (run.path / UNSYNCED_FILE).is_file():
            notes.append(f"{run.label}: the folder is marked unsynced; `declip push-metrics {run.path}` fixes MLflow")
        if not id_file.is_file():
            notes.append(f"{run.label}: no {RUN_ID_FILE} in the folder: not cross-checked")
            continue
        run_id = id_file.read_text().strip()
        try:
            remote = client.get_run(run_id).data.metrics
        except Exception as e:  # noqa: BLE001
            notes.append(f"{run.label}: MLflow run {run_id} not readable ({type(e).__name__}: {e})")
            continue
        bad = []
        for key, local in run.last_values().items():
            if key not in remote:
                bad.append(f"{key} missing in MLflow")
            elif not math.isclose(local, remote[key], rel_tol=1e-6, abs_tol=1e-9):
                bad.append(f"{key}: folder {local:.6g} vs MLflow {remote[key]:.6g}")
        if bad:
            notes.append(f"{run.label}: MLflow run {run_id} differs from metrics.jsonl: " + "; ".join(bad))
        else:
            notes.append(f"{run.label}: MLflow run {run_id} matches metrics.jsonl ({len(run.last_values())} metrics)")
    return notes


def log_report_to_mlflow(runs: list[Run], out_dir: Path, uri: str) -> str:
    """Log the report folder under `report/` of every run with a recorded MLflow run (else of a new
    "report" run); returns what happened, in words."""
    from declip.tracking import _client, _experiment_id, reachable

    if not reachable(uri):
        return f"MLflow at {uri} unreachable: report not logged"
    try:
        client = _client(uri)
        ids = [(r.path / RUN_ID_FILE).read_text().strip() for r in runs if (r.path / RUN_ID_FILE).is_file()]
        if not ids:
            experiment = (runs[0].config.get("tracking") or {}).get("experiment") or "declip"
            ids = [client.create_run(_experiment_id(client, experiment), run_name="report").info.run_id]
        for run_id in ids:
            client.log_artifacts(run_id, str(out_dir), artifact_path="report")
        return f"report logged to MLflow run(s) {', '.join(ids)}"
    except Exception as e:  # noqa: BLE001 - MLflow never fails a report
        return f"report not logged to MLflow ({type(e).__name__}: {e})"


# ---------------------------------------------------------------- the page


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def results_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "device", "Eval top1", "FPS", "devices", "steps"]
    rows = []
    for run in runs:
        s = run.summary or {}
        rows.append([run.label, str(s.get("device_type", "-")), _num(run.top1, ".2f"), _num(s.get("fps"), ".1f"),
                     _num(s.get("devices"), "d"), _num(s.get("steps"), "d")])  # fmt: skip
    for seed in SEED_ROWS:
        rows.append([seed["run"], seed["device"], _num(seed["top1"], ".2f"), _num(seed["fps"], ".1f"),
                     str(seed["devices"]), str(seed["steps"])])  # fmt: skip
    return header, rows


def _flat(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def run_blocks(run: Run) -> list[tuple]:
    s = run.summary or {}
    blocks: list[tuple] = [("h2", f"Run {run.label}"), ("p", f"Folder: {run.path}")]
    blocks += [("p", f"Note: {n}") for n in run.notes]
    if run.summary is None:
        blocks.append(("p", "No train_summary.json in the folder (training unfinished or not run here)."))
    else:
        keys = ["mode", "steps", "samples_seen", "device_type", "devices", "per_device_batch", "global_batch",
                "precision", "fps", "step_time_s", "data_time_fraction", "wall_time_s", "replaced_samples",
                "skipped_steps", "lr_scale"]  # fmt: skip
        rows = [[k, _flat(s[k])] for k in keys if k in s]
        rows += [[f"final {k}", _num(v, ".4f")] for k, v in (s.get("final_losses") or {}).items()]
        blocks += [("h3", "Training"), ("table", ["key", "value"], rows)]
        if s.get("versions"):
            blocks += [
                ("h3", "Versions"),
                ("table", ["package", "version"], [[k, _flat(v)] for k, v in s["versions"].items()]),
            ]
    if run.eval:
        keys = ["top1", "top5", "images", "classes", "templates", "step", "images_per_s", "wall_time_s", "checkpoint"]
        blocks += [("h3", "Zero-shot evaluation (eval.json)"),
                   ("table", ["key", "value"], [[k, _flat(run.eval[k])] for k in keys if k in run.eval])]  # fmt: skip
    blocks += data_check_blocks(run)
    if run.config_text is not None:
        blocks += [("h3", "Config (config.yaml)"), ("code", "yaml", run.config_text)]
    return blocks


def data_check_blocks(run: Run) -> list[tuple]:
    dc = run.data_check
    if dc is None:
        return [("h3", "Data check"), ("p", "No data_check.json in the run folder.")]
    bad = dc.get("bad") or {}
    dropped = sum(v for v in bad.values() if isinstance(v, int))
    text = f"{_flat(dc.get('total', '-'))} records checked, {_flat(dc.get('ok', '-'))} kept, {dropped} dropped"
    if dc.get("meta"):
        text += f" (manifest {dc['meta']})"
    blocks: list[tuple] = [("h3", "Data check"), ("p", text + ".")]
    if bad:
        blocks.append(("table", ["reason", "records dropped"], [[str(k), _flat(v)] for k, v in bad.items()]))
    examples = dc.get("examples") or {}
    rows = []
    for kind, items in examples.items():
        for ex in items if isinstance(items, list) else []:
            ex = ex if isinstance(ex, dict) else {"reason": ex}
            where = f"{ex.get('file', dc.get('meta', ''))}:{ex.get('line', '?')}"
            detail = "; ".join(f"{k}: {_flat(v)}" for k, v in ex.items() if k not in ("file", "line"))
            rows.append([str(kind), where, detail])
    if rows:
        blocks += [("p", "Examples (file:line):"), ("table", ["kind", "where", "detail"], rows)]
    return blocks


def build_blocks(runs: list[Run], plots: dict[str, Path], skipped: list[str], mlflow_notes: list[str]) -> list[tuple]:
    header, rows = results_table(runs)
    blocks: list[tuple] = [
        ("h1", "DeCLIP run report"),
        ("p", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} from {len(runs)} run folder(s)."),
        ("h2", "Results"),
        ("table", header, rows),
        ("p", "Eval top1: zero-shot top-1 (%) from eval.json, else the last evaluation during training. "
              "FPS: global training samples per second. The seed rows are the published numbers of the "
              "Ascend port (YFCC15M, ViT-B/32 DeCLIP, Ascend 910)."),
        ("h2", "Plots"),
    ]  # fmt: skip
    for stem, path in plots.items():
        blocks.append(("img", f"plots/{path.name}", PLOTS[stem][0]))
    if skipped:
        blocks += [("p", "Not plotted (no data):"), ("list", skipped)]
    if mlflow_notes:
        blocks += [("h2", "MLflow cross-check"), ("list", mlflow_notes)]
    for run in runs:
        blocks += run_blocks(run)
    return blocks


# ---------------------------------------------------------------- rendering


def _md_text(text: str) -> str:
    """Plain text for Markdown: no HTML gets through, no accidental emphasis or table breaks."""
    text = html.escape(str(text), quote=False)
    return re.sub(r"([\\`*_\[\]|#])", r"\\\1", text).replace("\n", " ")


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + _md_text(block[1]))
        elif kind == "p":
            out.append(_md_text(block[1]))
        elif kind == "list":
            out.append("\n".join(f"- {_md_text(item)}" for item in block[1]))
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(_md_text(h) for h in header) + " |", "|" + " --- |" * len(header)]
            lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{_md_text(block[2])}]({block[1]})")
        elif kind == "code":
            fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", block[2])), default=0))
            out.append(f"{fence}{block[1]}\n{block[2].rstrip()}\n{fence}")
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 980px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-size: 13px; color: #57606a; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12.5px; border-radius: 6px; }
"""


def to_html(blocks: list[tuple], base: Path) -> str:
    """Self-contained HTML: `img` blocks are read from `base` and embedded as data URIs."""
    e = html.escape
    title = next((b[1] for b in blocks if b[0] == "h1"), "report")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # No network at all, whatever a string might try: only inline styles and data: images.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
    ]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(block[1])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((base / block[1]).read_bytes()).decode()
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(block[2])}">'
                f"<figcaption>{e(block[2])}</figcaption></figure>"
            )
        elif kind == "code":
            out.append(f'<pre><code class="language-{e(block[1])}">{e(block[2])}</code></pre>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(run_dirs: list[Path], out_dir: Path, tracking_uri: str | None = None) -> dict:
    """Write `report.md`, `report.html` and `plots/*.png` into out_dir; returns their paths."""
    if not run_dirs:
        raise InputError("declip report: give at least one run folder")
    runs = [load_run(Path(p)) for p in run_dirs]
    seen: dict[str, int] = {}
    for run in runs:  # two runs of one config: tell them apart by folder
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} ({run.path.name})"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots, skipped = plot_runs(runs, out_dir / "plots")
    mlflow_notes = crosscheck_mlflow(runs, tracking_uri) if tracking_uri else []
    blocks = build_blocks(runs, plots, skipped, mlflow_notes)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write(md_path, lambda f: f.write(to_markdown(blocks).encode()))
    atomic_write(html_path, lambda f: f.write(to_html(blocks, out_dir).encode()))
    result = {"markdown": md_path, "html": html_path, "plots": list(plots.values())}
    if tracking_uri:
        result["mlflow"] = log_report_to_mlflow(runs, out_dir, tracking_uri)
    return result
