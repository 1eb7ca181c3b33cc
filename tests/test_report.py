"""Report: the seed's table beside the runs, real PNG plots, a self-contained escaped HTML page, MLflow best effort."""

import base64
import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image
from ports import free_port

from declip.config import TrackingConfig, load_config, save_config
from declip.errors import InputError
from declip.report import write_report

XSS = "<script>alert(1)</script>"
TINY = Path(__file__).resolve().parents[1] / "config" / "declip_tiny.yaml"


def make_run(run_dir: Path, steps: int = 100, evals: bool = True, lr: bool = True, name: str = "demo_tiny") -> dict:
    """A run folder as the trainer, `declip eval` and `declip check-data` leave it."""
    run_dir.mkdir(parents=True)
    cfg = load_config(TINY, [f"name={name}", "data.dataset_dir=/data/<b>demo</b>"])
    save_config(cfg, run_dir / "config.yaml")
    rows = []
    for step in range(10, steps + 1, 10):
        t = step / steps
        row = {"step": step, "loss": 5 - 3 * t, "mvs": 4 - 2 * t, "nns": 4.5 - 2 * t, "simsiam": -0.5 * t,
               "mlm": 9 - 4 * t, "logit_scale": 20 + 10 * t, "fps": 100 + math.sin(step), "data_time": 0.01}  # fmt: skip
        if lr:
            row["lr"] = 1e-3 * t
        rows.append(row)
        if evals and step % 50 == 0:
            rows.append({"step": step, "zeroshot_top1": 20 + 20 * t, "zeroshot_top5": 50 + 30 * t})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "name": name, "mode": "full", "steps": steps, "devices": 2, "device_type": "cpu", "global_batch": 128,
        "fps": 123.45, "data_time_fraction": 0.05, "final_losses": {"loss": 2.0, "mvs": 2.0}, "wall_time_s": 60.0,
        "replaced_samples": 3, "precision": "fp32", "versions": {"torch": "2.x", "python": "3.x"},
    }  # fmt: skip
    (run_dir / "train_summary.json").write_text(json.dumps(summary))
    if evals:
        (run_dir / "eval.json").write_text(json.dumps({"top1": 41.25, "top5": 80.0, "images": 90, "step": steps}))
    check = {
        "meta": "/data/train.json", "total": 1000, "ok": 997, "bad": {"empty_caption": 2, "missing_image": 1},
        "examples": {
            "empty_caption": [{"line": 17, "file": "/data/train.json", "reason": "caption is empty"}],
            "missing_image": [{"line": 99, "file": "/data/train.json", "reason": "image not found", "caption": XSS}],
        },
    }  # fmt: skip
    (run_dir / "data_check.json").write_text(json.dumps(check))
    return summary


def assert_real_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        extrema = im.convert("RGB").getextrema()
        assert any(lo != hi for lo, hi in extrema), f"{path} is a single colour"


def img_sources(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def test_report_holds_the_table_plots_and_escaped_strings(tmp_path):
    make_run(tmp_path / "run")
    paths = write_report([tmp_path / "run"], tmp_path / "report")
    md, page = paths["markdown"].read_text(), paths["html"].read_text()

    assert "| demo\\_tiny | cpu | 41.25 | 123.5 | 2 | 100 |" in md
    assert "| seed (Ascend 910) | npu | - | 85.0 | 1 | 100 |" in md
    assert "| seed (Ascend 910) | npu | 32.91 | 680.0 | 8 | 128000 |" in md
    cells = re.findall(r"<td>([^<]*)</td>", page)
    assert cells[:6] == ["demo_tiny", "cpu", "41.25", "123.5", "2", "100"]
    assert cells[6:18] == ["seed (Ascend 910)", "npu", "-", "85.0", "1", "100",
                           "seed (Ascend 910)", "npu", "32.91", "680.0", "8", "128000"]  # fmt: skip

    stems = sorted(p.stem for p in paths["plots"])
    assert stems == ["fps", "logit_scale", "loss", "lr", "zeroshot_top1"]
    for plot in paths["plots"]:
        assert_real_png(plot)
        assert f"](plots/{plot.name})" in md
    sources = img_sources(page)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert embedded == {p.read_bytes() for p in paths["plots"]}
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page

    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;demo&lt;/b&gt;" in page
    assert XSS not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    for text in (md, page):
        assert "1000 records checked, 997 kept, 3 dropped" in text
        assert "/data/train.json:17" in text and "/data/train.json:99" in text
    assert "empty_caption" in page and "missing_image" in page
    assert "<td>precision</td><td>fp32</td>" in page and "<td>torch</td><td>2.x</td>" in page
    assert "dataset_dir: /data/&lt;b&gt;demo&lt;/b&gt;" in page  # the config YAML block


def test_absent_data_is_skipped_and_said(tmp_path):
    make_run(tmp_path / "run", evals=False, lr=False)
    (tmp_path / "run" / "data_check.json").unlink()
    paths = write_report([tmp_path / "run"], tmp_path / "report")
    assert sorted(p.stem for p in paths["plots"]) == ["fps", "logit_scale", "loss"]
    md = paths["markdown"].read_text()
    assert "zeroshot\\_top1: no \\`zeroshot\\_top1\\` values" in md and "lr: no \\`lr\\` values" in md
    assert "| demo\\_tiny | cpu | - | 123.5 | 2 | 100 |" in md
    assert "No data\\_check.json in the run folder." in md
    assert not (tmp_path / "report" / "plots" / "lr.png").exists()


def test_two_runs_share_the_page(tmp_path):
    make_run(tmp_path / "a", name="same")
    make_run(tmp_path / "b", steps=40, name="same")
    paths = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")
    md = paths["markdown"].read_text()
    assert "| same (a) | cpu | 41.25 | 123.5 | 2 | 100 |" in md and "| same (b) | cpu | 41.25 | 123.5 | 2 | 40 |" in md


def test_not_a_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a run folder"):
        write_report([tmp_path / "empty"], tmp_path / "report")


def test_mlflow_down_never_fails_the_report(tmp_path):
    make_run(tmp_path / "run")
    uri = f"http://127.0.0.1:{free_port()}"
    paths = write_report([tmp_path / "run"], tmp_path / "report", tracking_uri=uri)
    assert paths["html"].is_file() and "unreachable" in paths["mlflow"]
    assert f"MLflow at {uri} is unreachable" in paths["html"].read_text()


@pytest.mark.slow
def test_mlflow_crosscheck_notes_mismatches_and_logs_the_report(tmp_path, monkeypatch):
    from declip.tracking import Tracker, _client

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    monkeypatch.delenv("DECLIP_MLFLOW_PARENT_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    make_run(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (run_dir / "metrics.jsonl").unlink()
    tracker = Tracker(run_dir, TrackingConfig(uri=uri, experiment="report-test"), "demo")
    assert tracker.synced
    for row in rows:
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
    tracker.finish()
    with open(run_dir / "metrics.jsonl", "a") as f:  # a value MLflow never saw
        f.write(json.dumps({"step": 110, "loss": 0.5}) + "\n")

    paths = write_report([run_dir], tmp_path / "report", tracking_uri=uri)
    page = paths["html"].read_text()
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert f"MLflow run {run_id} differs from metrics.jsonl: loss: folder 0.5 vs MLflow 2</li>" in page
    assert paths["mlflow"] == f"report logged to MLflow run(s) {run_id}"
    logged = {a.path for a in _client(uri).list_artifacts(run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/plots"} <= logged
