"""`declip <verb>`: each verb parses its arguments and calls one library function.

Heavy modules are imported inside the verb so `declip --help` stays instant.
Expected failures (bad config, bad input) print one line naming the key or
path and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load_cfg(args: argparse.Namespace):
    from declip.config import load_config

    return load_config(args.config, args.set or [])


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="run config YAML (see config/)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. --set train.max_steps=10"
    )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    from declip.train.loop import train

    summary = train(cfg, Path(args.out), device=args.device)
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: summary[k] for k in ("steps", "devices", "device_type", "fps")}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    from declip.evaluate import run_eval

    run_eval(cfg, Path(args.checkpoint), Path(args.out), device=args.device, run_dir=args.run_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from declip.report import write_report

    paths = write_report([Path(p) for p in args.run_dirs], Path(args.out), tracking_uri=args.tracking_uri)
    print(f"report: {paths['markdown']} and {paths['html']}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from declip.data.check import check_data

    summary = check_data(Path(args.meta), Path(args.root), Path(args.out), decode=args.decode, workers=args.workers)
    bad = sum(summary["bad"].values())
    print(f"check-data: {summary['total']} lines, {summary['ok']} ok, {bad} bad -> {args.out}")
    return 0


def cmd_setup_nltk(args: argparse.Namespace) -> int:
    from declip.text.nltk_setup import setup_nltk

    setup_nltk(Path(args.data_dir), [Path(p) for p in args.sources or []], allow_download=not args.offline)
    return 0


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from declip.data.demo import make_demo_data

    summary = make_demo_data(Path(args.out_dir), seed=args.seed)
    print(json.dumps(summary))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from declip.convert import convert_checkpoint_file

    convert_checkpoint_file(Path(args.src), Path(args.dst))
    print(f"converted {args.src} -> {args.dst}")
    return 0


def cmd_push_metrics(args: argparse.Namespace) -> int:
    from declip.tracking import push_run_dir

    run_id = push_run_dir(Path(args.run_dir), uri=args.tracking_uri)
    print(f"pushed {args.run_dir} to MLflow run {run_id}")
    return 0


def cmd_config_doc(args: argparse.Namespace) -> int:
    from declip.config import documented_keys

    print("| key | default | meaning |\n| --- | --- | --- |")
    for key, text, default in documented_keys():
        print(f"| `{key}` | `{default}` | {text} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="declip", description="DeCLIP pre-training and zero-shot evaluation")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train (launch with torchrun for several devices)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder; a checkpoint there is resumed")
    p.add_argument("--device", choices=["npu", "cuda", "cpu"], help="override device detection")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="zero-shot ImageNet-style evaluation of a checkpoint")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint .pt or .safetensors")
    p.add_argument("--out", required=True, help="eval.json to write")
    p.add_argument("--device", choices=["npu", "cuda", "cpu"], help="override device detection")
    p.add_argument("--run-dir", help="training run folder whose MLflow run receives the metrics")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="Markdown + HTML report from run folders")
    p.add_argument("run_dirs", nargs="+", help="run folders")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--tracking-uri", help="MLflow URI to cross-check and log the report to")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("check-data", help="validate a manifest, write clean.jsonl and data_check.json")
    p.add_argument("--meta", required=True, help="JSON Lines manifest")
    p.add_argument("--root", required=True, help="image root folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--decode", action="store_true", help="decode every image (slow, thorough)")
    p.add_argument("--workers", type=int, help="parallel processes (default: all cores)")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("setup-nltk", help="make wordnet, omw-1.4 and stopwords available offline")
    p.add_argument("--data-dir", default="resources/nltk_data", help="NLTK data folder to fill")
    p.add_argument("--from", dest="sources", action="append", help="a zip or folder holding corpora")
    p.add_argument("--offline", action="store_true", help="never try nltk.download")
    p.set_defaults(func=cmd_setup_nltk)

    p = sub.add_parser("make-demo-data", help="generate the embedded demo dataset")
    p.add_argument("out_dir", help="dataset folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_demo_data)

    p = sub.add_parser("convert-checkpoint", help="convert a released DeCLIP checkpoint to ours")
    p.add_argument("src", help="reference checkpoint ({'model': state_dict})")
    p.add_argument("dst", help="output .safetensors")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("push-metrics", help="push a run folder's metrics to MLflow (after an outage)")
    p.add_argument("run_dir")
    p.add_argument("--tracking-uri", help="MLflow URI (default: the run's config)")
    p.set_defaults(func=cmd_push_metrics)

    p = sub.add_parser("config-doc", help="print every config key with its default and meaning")
    p.set_defaults(func=cmd_config_doc)
    return parser


def main(argv: list[str] | None = None) -> int:
    from declip.config import ConfigError
    from declip.errors import InputError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"declip {args.verb}: config error: {e}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"declip {args.verb}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
