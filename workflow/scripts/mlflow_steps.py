"""MLflow bookkeeping of the workflow: one parent run per target, one child run per step.

    mlflow_steps.py parent-start --config C [--set K=V] --name NAME --out PARENT_JSON
    mlflow_steps.py parent-id PARENT_JSON
    mlflow_steps.py parent-end PARENT_JSON --status FINISHED
    mlflow_steps.py step --config C [--set K=V] --name NAME --run-dir DIR [--json FILE] [--artifact PATH]...

The parent's id travels to every later rule as $DECLIP_MLFLOW_PARENT_RUN_ID, so each
`declip.tracking.Tracker` (the trainer's and the `step` runs here) becomes its child. `parent-id`
uses the standard library only: in docker mode it runs on the host, outside the image. Like all
tracking, nothing here fails a step when MLflow is down: the parent id is then empty.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def tracking_config(args: argparse.Namespace):
    from declip.config import load_config

    return load_config(args.config, args.set or []).tracking


def ensure_experiment(uri: str, name: str) -> None:
    """With a SQLite store, create the experiment with its artifacts beside the database: MLflow's
    default, ./mlruns of whichever process first logs, would scatter them over working directories."""
    if not uri.startswith("sqlite:///"):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        artifacts = Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
        client.create_experiment(name, artifact_location=artifacts.as_uri())


def parent_start(args: argparse.Namespace) -> None:
    from declip.tracking import resolve_uri, start_parent_run

    cfg = tracking_config(args)
    try:
        ensure_experiment(resolve_uri(cfg.uri), cfg.experiment)
    except Exception as e:  # tracking never stops the workflow; start_parent_run warns again if the store is down
        print(f"warning: MLflow experiment {cfg.experiment!r} not prepared ({type(e).__name__}: {e})", file=sys.stderr)
    run_id = start_parent_run(cfg, args.name, tags={"declip.target": args.name, "declip.workflow": "snakemake"})
    record = {
        "run_id": run_id or "",
        "target": args.name,
        "tracking_uri": resolve_uri(cfg.uri),
        "experiment": cfg.experiment,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"MLflow parent run {run_id or '(none: tracking unavailable)'} for {args.name}")


def parent_id(args: argparse.Namespace) -> None:
    print(json.loads(Path(args.parent).read_text())["run_id"])


def parent_end(args: argparse.Namespace) -> None:
    from declip.config import TrackingConfig
    from declip.tracking import end_run

    record = json.loads(Path(args.parent).read_text())
    if record["run_id"]:
        end_run(record["run_id"], args.status, TrackingConfig(uri=record["tracking_uri"]))
        print(f"MLflow parent run {record['run_id']} ended: {args.status}")


def numbers(values: dict) -> dict[str, float]:
    """The numeric leaves of a JSON object as dotted metric names (booleans are not numbers here)."""
    from declip.config import flatten

    flat = flatten(values)
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def step(args: argparse.Namespace) -> None:
    from declip.tracking import METRICS_FILE, RUN_ID_FILE, Tracker

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Each execution of a step is a new child run (of this invocation's parent), never the last one's.
    for name in (RUN_ID_FILE, METRICS_FILE):
        (run_dir / name).unlink(missing_ok=True)
    tracker = Tracker(run_dir, tracking_config(args), run_name=args.name)
    tracker.log_params({"step": args.name})
    files = [Path(args.json)] if args.json else []
    if args.json:
        tracker.log_metrics(numbers(json.loads(Path(args.json).read_text())), step=0)
    for path in map(Path, args.artifact or []):
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for path in files:
        tracker.log_artifact(path)
    tracker.finish("FINISHED")
    print(f"MLflow child run {tracker.run_id or '(none)'}: {args.name}, {len(files)} artifacts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb, func in (("parent-start", parent_start), ("step", step)):
        p = sub.add_parser(verb)
        p.add_argument("--config", required=True, help="run config whose tracking section applies")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="run config override")
        p.add_argument("--name", required=True, help="target (parent) or step (child) name")
        p.set_defaults(func=func)
        if verb == "parent-start":
            p.add_argument("--out", required=True, help="parent JSON to write")
        else:
            p.add_argument("--run-dir", required=True, help="folder of the step's metrics.jsonl and run id")
            p.add_argument("--json", help="JSON file whose numbers become metrics (and an artifact)")
            p.add_argument("--artifact", action="append", help="file or folder to log")
    p = sub.add_parser("parent-id")
    p.add_argument("parent")
    p.set_defaults(func=parent_id)
    p = sub.add_parser("parent-end")
    p.add_argument("parent")
    p.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    p.set_defaults(func=parent_end)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
