"""The Snakemake workflow, by dry run: each target's jobs and their order, config validation,
the launch commands, the SLURM profile, snakefmt and `snakemake --lint`.

Dry runs build the real DAG from the real Snakefile; outputs point into a temporary folder and the
perf/full targets at a fake dataset with the seed's five entries, so input checks pass.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
RULE_FILES = ["Snakefile", *sorted(str(p.relative_to(REPO)) for p in (REPO / "workflow" / "rules").glob("*.smk"))]


@dataclass
class Job:
    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    resources: dict[str, str] = field(default_factory=dict)
    shell: str = ""


def parse_dry_run(text: str) -> list[Job]:
    """The jobs of `snakemake -n -p` output, with their files, wildcards, resources and command."""
    jobs: list[Job] = []
    for line in text.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append(Job(m.group(1)))
        elif jobs and (m := re.match(r"^    (input|output|wildcards|resources): (.*)$", line)):
            key, value = m.groups()
            if key in ("input", "output"):
                getattr(jobs[-1], key + "s").extend(v.strip() for v in value.split(", "))
            else:
                pairs = dict(item.split("=", 1) for item in value.split(", "))
                setattr(jobs[-1], key, pairs)
        elif jobs and line.startswith("Shell command: "):
            command = line.removeprefix("Shell command: ")
            jobs[-1].shell = "" if command == "None" else command  # target rules run nothing
    return jobs


def snakemake(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SNAKEMAKE, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dry_run(target: str | None, out: Path, *config: str, extra: tuple[str, ...] = ()) -> list[Job]:
    """`snakemake -n -p [target]` (None: the default target) with outputs under `out`."""
    proc = snakemake(
        "-n", "-p", "--nolock", *extra, *([target] if target else []), "--config",
        f"results_dir={out}/results", f"resources_dir={out}/resources", *config,
    )  # fmt: skip
    return parse_dry_run(proc.stdout)


@pytest.fixture(scope="module")
def seed_dataset(tmp_path_factory) -> Path:
    """The seed's ./dataset as tiny fakes: both manifests, both image folders and the BPE vocab."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "yfcc15m_clean_open_data").mkdir()
    (root / "imagenet_val").mkdir()
    (root / "yfcc15m_clean_open_data.json").write_text('{"caption": "a dog", "filename": "a.jpg", "url": ""}\n')
    (root / "val_official.json").write_text(
        '{"filename": "ILSVRC2012_val_00000001.JPEG", "label": 0, "label_name": "x"}\n'
    )
    (root / "bpe_simple_vocab_16e6.txt.gz").write_bytes(b"")
    return root


def assert_before(jobs: list[Job], edges: list[tuple[str, str]], target: str) -> None:
    """Each (producer, consumer) pair of rules is a real dependency: an output of one is an input of the other."""
    by_rule = {j.rule: j for j in jobs if j.wildcards.get("target", target) == target}
    for producer, consumer in edges:
        shared = set(by_rule[producer].outputs) & set(by_rule[consumer].inputs)
        assert shared, f"{consumer} does not consume an output of {producer} ({target})"


CHAIN = [
    ("mlflow_parent", "setup_nltk"),
    ("mlflow_parent", "check_data"),
    ("check_data", "train"),
    ("setup_nltk", "train"),
    ("train", "report"),
]
FULL = ["mlflow_parent", "setup_nltk", "check_data", "train", "zero_shot_eval", "report"]
PERF = ["mlflow_parent", "setup_nltk", "check_data", "train", "report"]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("perf_1p", PERF),
        ("full_1p", FULL),
        ("perf_8p", PERF),
        ("full_8p", FULL),
    ],
)
def test_seed_targets_list_their_jobs_in_order(target, expected, seed_dataset, tmp_path):
    jobs = dry_run(target, tmp_path, f"dataset_dir={seed_dataset}")
    assert Counter(j.rule for j in jobs) == Counter([*expected, target])
    assert {j.wildcards.get("target") for j in jobs if j.rule != target} == {target}
    edges = CHAIN + (
        [("train", "zero_shot_eval"), ("zero_shot_eval", "report")] if "zero_shot_eval" in expected else []
    )
    assert_before(jobs, edges, target)
    # Training reads the clean manifest that check_data writes, by absolute path.
    train = next(j for j in jobs if j.rule == "train")
    clean = f"{tmp_path}/results/{target}/clean.jsonl"
    assert clean in train.inputs
    assert f"--set data.train_meta={clean}" in train.shell
    assert f"--set data.dataset_dir={seed_dataset}" in train.shell
    assert_on_host(jobs)


def assert_on_host(jobs: list[Job]) -> None:
    """container_runtime none: every command runs with the Python running Snakemake, no container."""
    for job in (j for j in jobs if j.shell):
        assert "docker" not in job.shell and f"{sys.executable} " in job.shell, job.rule


def test_demo_is_the_default_target_and_runs_the_whole_chain_on_the_generated_data(tmp_path):
    jobs = dry_run(None, tmp_path)  # no target: the default one
    assert Counter(j.rule for j in jobs) == Counter(["make_demo_data", *FULL, "demo"])
    assert_before(jobs, [*CHAIN, ("train", "zero_shot_eval"), ("zero_shot_eval", "report")], "demo")
    check = next(j for j in jobs if j.rule == "check_data")
    assert f"{tmp_path}/resources/demo_dataset/yfcc15m_clean_open_data.json" in check.inputs
    train = next(j for j in jobs if j.rule == "train")
    assert " -m declip train --config config/declip_tiny.yaml " in train.shell
    assert "torch.distributed.run" not in train.shell  # one CPU process, no rendezvous
    assert train.resources["npu"] == "0" and train.resources["gpu"] == "0"
    assert_on_host(jobs)


def test_ablation_trains_six_variants_at_equal_steps_and_tabulates_them(tmp_path):
    jobs = dry_run("ablation", tmp_path, "ablation_steps=123")
    variants = ["clip", "declip", "no_mvs", "no_nns", "no_simsiam", "no_mlm"]
    shared = ["make_demo_data", "mlflow_parent", "setup_nltk", "check_data", "ablation_table", "ablation"]
    assert Counter(j.rule for j in jobs) == Counter(shared + ["train"] * 6 + ["zero_shot_eval"] * 6)
    trains = {j.wildcards["target"]: j.shell for j in jobs if j.rule == "train"}
    assert sorted(trains) == sorted(f"ablation/{v}" for v in variants)
    for shell in trains.values():
        assert "--set train.max_steps=123 --set train.cosine_end_step=123" in shell
        assert "--set train.seed=" not in shell  # every variant keeps the config's seed
    assert "--set loss.image_views=1 --set loss.text_views=1" in trains["ablation/clip"]
    assert "--set loss.nns_weight=0" in trains["ablation/no_nns"]
    assert "--set loss.simsiam_weight=0" in trains["ablation/no_simsiam"]
    assert "--set loss.mlm_weight=0" in trains["ablation/no_mlm"]
    assert "--set loss.text_views=1" in trains["ablation/no_mvs"]
    assert "loss." not in trains["ablation/declip"]
    table = next(j for j in jobs if j.rule == "ablation_table")
    assert sorted(table.inputs) == sorted(
        [f"{tmp_path}/results/ablation/{v}/eval.json" for v in variants]
        + [f"{tmp_path}/results/ablation/mlflow_parent.json"]
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("dataset_dri=x", "'dataset_dri' was unexpected"),
        ("nodes=two", "'two' is not of type 'integer'"),
        ("container_runtime=podman", "'podman' is not one of ['none', 'docker']"),
        ("visible_devices=0;1", "does not match"),
    ],
)
def test_a_bad_config_key_or_value_stops_before_any_job(setting, message, tmp_path):
    proc = snakemake("-n", "demo", "--config", setting, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "Error validating config file" in output and message in output
    assert "Building DAG of jobs" not in output


def test_eight_device_training_launches_torchrun_with_split_threads_and_device_resources(seed_dataset, tmp_path):
    jobs = dry_run(
        "full_8p", tmp_path, f"dataset_dir={seed_dataset}", "visible_devices=0,1,2,3,4,5,6,7", extra=("--cores", "16")
    )
    train = next(j for j in jobs if j.rule == "train")
    assert " -m torch.distributed.run --standalone --nproc-per-node=8 -m declip train " in train.shell
    assert "export OMP_NUM_THREADS=2;" in train.shell  # 16 cores / 8 ranks
    assert "export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in train.shell
    # The device check runs before the launcher, in the same `set -e` shell, so a shortfall stops it.
    assert train.shell.index("check_devices.py --target full_8p --need 8") < train.shell.index("torch.distributed.run")
    assert train.resources["npu"] == "8" and train.resources["slurm_extra"] == "--gres=npu:8"
    assert next(j for j in jobs if j.rule == "zero_shot_eval").resources["npu"] == "1"
    assert "--set train.mode=full --set train.max_steps=128000" in train.shell


def test_a_fixed_master_port_replaces_the_standalone_rendezvous(seed_dataset, tmp_path):
    jobs = dry_run("perf_8p", tmp_path, f"dataset_dir={seed_dataset}", "master_port=29611", "device_resource=gpu")
    train = next(j for j in jobs if j.rule == "train")
    assert "--nnodes=1 --master-addr=127.0.0.1 --master-port=29611 --nproc-per-node=8" in train.shell
    assert "--set train.mode=perf --set train.perf_steps=100" in train.shell
    assert train.resources["gpu"] == "8" and train.resources["npu"] == "0"


def test_slurm_profile_resolves_a_multi_node_run(seed_dataset, tmp_path):
    """The slurm executor needs no sbatch for a dry run: the profile, the resources and the
    per-node torchrun under srun all resolve here."""
    jobs = dry_run(
        "full_8p", tmp_path, f"dataset_dir={seed_dataset}", "nodes=4",
        extra=("--profile", "workflow/profiles/slurm"),
    )  # fmt: skip
    train = next(j for j in jobs if j.rule == "train")
    assert train.resources["nodes"] == "4" and train.resources["tasks"] == "4"
    assert train.resources["mpi"] == "srun" and train.resources["slurm_extra"] == "--gres=npu:8"
    assert train.resources["runtime"] == "4320"
    assert "srun --nodes=$SLURM_NNODES --ntasks-per-node=1 " in train.shell
    assert "--nnodes=$SLURM_NNODES --nproc-per-node=8 --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d" in train.shell
    assert '--rdzv-endpoint=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):29500' in train.shell
    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["set-threads"]["train"] == 64


def test_every_rule_has_a_log_and_a_benchmark():
    text = "\n".join((REPO / f).read_text() for f in RULE_FILES)
    rules = re.findall(r"^rule (\w+):\n((?:    .*\n|\n)*)", text, flags=re.M)
    targets = {"demo", "perf_1p", "full_1p", "perf_8p", "full_8p", "ablation"}
    steps = {name: body for name, body in rules if name not in targets}
    assert set(steps) == {"make_demo_data", "mlflow_parent", "setup_nltk", "check_data", "train",
                          "zero_shot_eval", "report", "ablation_table"}  # fmt: skip
    for name, body in steps.items():
        assert "\n    log:\n" in body and "\n    benchmark:\n" in body, name


def test_every_config_key_is_in_the_schema_with_a_description_and_in_the_docs():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    docs = (REPO / "docs/workflow.md").read_text()
    assert schema["additionalProperties"] is False
    assert set(config) == set(schema["properties"]) == set(schema["required"])
    for key, spec in schema["properties"].items():
        assert spec.get("description"), key
        assert f"`{key}`" in docs, f"docs/workflow.md does not document config key {key}"


def test_snakefmt_leaves_the_workflow_unchanged():
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "snakefmt"), "--check", *RULE_FILES],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakemake_lint_is_clean():
    proc = snakemake("--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def load_script(name: str):
    """A workflow/scripts/<name>.py module (they are run as files by the rules, not imported as a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "workflow" / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_check_stops_an_eight_device_target_short_of_devices():
    verdict = load_script("check_devices").verdict
    ok, message = verdict("full_8p", 8, {"npu": 4, "cuda": 0}, smi=4)
    assert not ok
    assert message == (
        "full_8p needs 8 devices per node but found 4 NPU(s) via torch_npu, 0 CUDA device(s), "
        "npu-smi reports 4; stopping before training"
    )
    ok, message = verdict("full_8p", 8, {"npu": 0, "cuda": 0}, smi=8)
    assert not ok and "npu-smi sees NPUs but torch_npu does not" in message
    assert verdict("perf_8p", 8, {"npu": 0, "cuda": 8}, smi=None) == (
        True, "perf_8p: 8 device(s) per node needed, found 0 NPU(s) via torch_npu, 8 CUDA device(s): using cuda"
    )  # fmt: skip
    ok, message = verdict("perf_1p", 1, {"npu": 0, "cuda": 0}, smi=None)
    assert ok and message.startswith("warning: perf_1p:") and message.endswith("training on CPU")


def test_ablation_table_ranks_variants_against_chance(tmp_path):
    import json

    table = load_script("ablation_table")
    runs = []
    for variant, top1 in (("clip", 10.0), ("declip", 16.5)):
        run = tmp_path / variant
        run.mkdir()
        (run / "eval.json").write_text(json.dumps({"top1": top1, "top5": 50.0, "classes": 35}))
        (run / "train_summary.json").write_text(json.dumps({"steps": 400}))
        runs.append(str(run))
    out = [f"--out-{k}={tmp_path / f'ablation.{ext}'}" for k, ext in (("md", "md"), ("plot", "png"), ("json", "json"))]
    assert table.main([*runs, *out]) == 0
    md = (tmp_path / "ablation.md").read_text()
    assert "over 35 classes (chance 2.9% top-1)" in md
    assert "| declip | DeCLIP: MVS + NNS + SimSiam + MLM | 16.50 | 50.00 |" in md
    assert json.loads((tmp_path / "ablation.json").read_text())["clip"] == {"top1": 10.0, "top5": 50.0}
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "declip" / "train_summary.json").write_text(json.dumps({"steps": 399}))
    assert table.main([*runs, *out]) == 1  # unequal steps: not an ablation


def test_step_metrics_are_the_numeric_leaves_of_the_summary():
    numbers = load_script("mlflow_steps").numbers
    summary = {"total": 10, "ok": 8, "bad": {"missing": 2, "empty_caption": 0}, "root": "/x", "decode": False}
    assert numbers(summary) == {"total": 10.0, "ok": 8.0, "bad.missing": 2.0, "bad.empty_caption": 0.0}
