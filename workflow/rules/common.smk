"""Config validation, the target table, paths, and the helpers that turn a target into command lines.

Every rule's command is `{params.run} <command>`: `run` is empty on the host and inside Apptainer
(Snakemake wraps the whole job there), and a `docker run ...` prefix when container_runtime is docker.
"""

import grp
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

from declip.config import load_config

validate(config, "../schemas/config.schema.yaml")

# ---------------------------------------------------------------- paths

RESULTS = config["results_dir"].rstrip("/")
RESOURCES = config["resources_dir"].rstrip("/")
DEMO_DATA = f"{RESOURCES}/demo_dataset"
NLTK_DIR = f"{RESOURCES}/nltk_data"
SCRIPTS = str(Path(workflow.basedir) / "workflow" / "scripts")
# Absolute, so that rules inside containers (same paths mounted) and `mlflow ui` in the project
# folder all open the same store.
TRACKING_URI = config["tracking_uri"] or f"sqlite:///{Path('mlflow.db').resolve()}"
CONTAINER = config["container"] or None
# Threads of train and check_data: capped at --cores when run locally; under SLURM this is
# cpus-per-task (the slurm profile sets it per rule).
MAX_THREADS = 64


def in_container() -> bool:
    """Whether commands run inside the image (Apptainer or docker) rather than in this Python."""
    apptainer = (
        DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method
    )
    return apptainer or config["container_runtime"] == "docker"


# The host runs the commands with the Python running Snakemake (no venv activation needed); an image
# has its own `python3` with the project installed.
PYTHON = "python3" if in_container() else sys.executable
DECLIP = f"{PYTHON} -m declip"
TORCHRUN = f"{PYTHON} -m torch.distributed.run"


def check_runtime() -> None:
    """Refuse container settings that cannot work, naming the config key."""
    if config["container_runtime"] != "docker":
        return
    if DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method:
        raise ValueError(
            "config key 'container_runtime': docker cannot be combined with --sdm apptainer"
        )
    if not CONTAINER or CONTAINER.endswith(".sif"):
        raise ValueError(
            f"config key 'container': docker needs an image name, got {config['container']!r}"
        )


check_runtime()

# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One training the workflow can run.

    devices: processes per node; overrides: the `--set` items that make this target (mode, steps,
    ablated terms); accelerated: needs NPUs/GPUs (device check, device resources, container
    devices); home: results folder of its setup/check/parent steps when not its own (ablation).
    """

    devices: int
    run_config: str
    dataset: str
    overrides: tuple[str, ...]
    accelerated: bool
    home: str = ""


SEED = dict(
    run_config=config["run_config"], dataset=config["dataset_dir"], accelerated=True
)
PERF = ("train.mode=perf", f"train.perf_steps={config['perf_steps']}")
FULL = ("train.mode=full", f"train.max_steps={config['full_steps']}")
DEMO = dict(run_config=config["demo_config"], dataset=DEMO_DATA, accelerated=False)

# The seed's four scripts, plus the CPU demo.
TARGETS = {
    "demo": Target(1, overrides=("train.mode=full",), **DEMO),
    "perf_1p": Target(1, overrides=PERF, **SEED),
    "full_1p": Target(1, overrides=FULL, **SEED),
    "perf_8p": Target(8, overrides=PERF, **SEED),
    "full_8p": Target(8, overrides=FULL, **SEED),
}
FULL_MODE = {name for name, t in TARGETS.items() if "train.mode=full" in t.overrides}

# DeCLIP minus one term at a time, against plain CLIP and the full objective. Remaining weights are
# kept as they are (not renormalised). SimSiam needs both image views, so "no_mvs" drops the EDA
# text view: the contrastive loss falls from 2x2 to 2x1 image-text pairs.
ABLATION = {
    "clip": (
        "loss.image_views=1",
        "loss.text_views=1",
        "data.eda=false",
        "loss.mvs_weight=1.0",
        "loss.nns_weight=0",
        "loss.simsiam_weight=0",
        "loss.mlm_weight=0",
    ),
    "declip": (),
    "no_mvs": ("loss.text_views=1", "data.eda=false"),
    "no_nns": ("loss.nns_weight=0",),
    "no_simsiam": ("loss.simsiam_weight=0",),
    "no_mlm": ("loss.mlm_weight=0",),
}
ABLATION_STEPS = (
    "train.mode=full",
    f"train.max_steps={config['ablation_steps']}",
    f"train.cosine_end_step={config['ablation_steps']}",
)
for _variant, _terms in ABLATION.items():
    TARGETS[f"ablation/{_variant}"] = Target(
        1, overrides=ABLATION_STEPS + _terms, home="ablation", **DEMO
    )
    FULL_MODE.add(f"ablation/{_variant}")

HOMES = [name for name, t in TARGETS.items() if not t.home] + ["ablation"]
RUN_RE = "|".join(map(re.escape, TARGETS))
HOME_RE = "|".join(map(re.escape, HOMES))
REPORTED_RE = "|".join(map(re.escape, (n for n, t in TARGETS.items() if not t.home)))


def home_of(target: str) -> str:
    t = TARGETS.get(target)
    return t.home if t and t.home else target


def home_target(home: str) -> Target:
    """The target whose run config and dataset the shared steps of `home` use."""
    return TARGETS["ablation/declip"] if home == "ablation" else TARGETS[home]


def is_accelerated(target: str) -> bool:
    return home_target(home_of(target)).accelerated


@cache
def run_config(path: str):
    return load_config(path)


def data_file(target: str, key: str) -> str:
    """A data file of the target's dataset, e.g. key 'train_meta' -> DATASET/yfcc15m_clean_open_data.json."""
    t = home_target(home_of(target))
    return str(Path(t.dataset) / getattr(run_config(t.run_config).data, key))


def target_files(name: str) -> list[str]:
    """What `snakemake <name>` builds."""
    if name == "ablation":
        return [f"{RESULTS}/ablation/ablation.md", f"{RESULTS}/ablation/ablation.png"]
    files = [
        f"{RESULTS}/{name}/report/report.md",
        f"{RESULTS}/{name}/report/report.html",
    ]
    return files + ([f"{RESULTS}/{name}/eval.json"] if name in FULL_MODE else [])


# ---------------------------------------------------------------- input functions


def parent_json(wildcards) -> str:
    return f"{RESULTS}/{home_of(wildcards.target)}/mlflow_parent.json"


def nltk_summary(wildcards) -> str:
    return f"{RESULTS}/{home_of(wildcards.target)}/setup_nltk.json"


def clean_manifest(wildcards) -> str:
    return f"{RESULTS}/{home_of(wildcards.target)}/clean.jsonl"


def train_meta(wildcards) -> str:
    return data_file(wildcards.target, "train_meta")


def train_root(wildcards) -> str:
    return data_file(wildcards.target, "train_root")


def val_meta(wildcards) -> str:
    return data_file(wildcards.target, "val_meta")


def report_inputs(wildcards) -> list[str]:
    run = f"{RESULTS}/{wildcards.target}"
    files = [f"{run}/train_summary.json", f"{run}/data_check.json"]
    return files + ([f"{run}/eval.json"] if wildcards.target in FULL_MODE else [])


def demo_dir(wildcards, output) -> str:
    return str(Path(output[0]).parent)


def ablation_runs(wildcards) -> list[str]:
    return [f"{RESULTS}/ablation/{v}" for v in ABLATION]


def ablation_evals(wildcards) -> list[str]:
    return [f"{run}/eval.json" for run in ablation_runs(wildcards)]


# ---------------------------------------------------------------- command lines
# Each returns a piece of a rule's shell command, so that shell strings name only params, inputs,
# outputs and wildcards (provenance: a changed command reruns the job).


def run_dir(wildcards) -> str:
    return f"{RESULTS}/{wildcards.target}"


def declip(wildcards) -> str:
    """`declip` as the job runs it: in the image (docker) or with this Python."""
    return f"{container_run(wildcards)} {DECLIP}".strip()


def declip_on_devices(wildcards) -> str:
    """`declip` for eval: like `declip`, with the target's devices in the container."""
    return f"{accelerator_run(wildcards)} {DECLIP}".strip()


def script(name: str, accelerated: bool = False):
    """Input function for params: the command running workflow/scripts/<name>.py for the job."""

    def command(wildcards) -> str:
        run = accelerator_run(wildcards) if accelerated else container_run(wildcards)
        return f"{run} {PYTHON} {SCRIPTS}/{name}.py".strip()

    return command


def track_step(name: str):
    """Input function for params: the command that logs step `name` as a child of the target's parent."""

    def command(wildcards) -> str:
        runner = script("mlflow_steps")(wildcards)
        where = f"--name {name} --run-dir {RESULTS}/{wildcards.target}/steps/{name}"
        return f"{runner} step {tracking_args(wildcards)} {where}"

    return command


def start_parent(wildcards) -> str:
    runner = script("mlflow_steps")(wildcards)
    return f"{runner} parent-start {tracking_args(wildcards)} --name {wildcards.target}"


def end_parent(wildcards) -> str:
    """Close the target's parent run: its last step has finished."""
    runner = script("mlflow_steps")(wildcards)
    return f"{runner} parent-end {parent_json(wildcards)} --status FINISHED"


def run_args(wildcards) -> str:
    """`--config C --set ...` of train and eval: the target's run config, its dataset (absolute, so
    containers and any working directory agree), the clean manifest, tracking and the user's extras.
    """
    t = TARGETS[wildcards.target]
    sets = [
        f"data.dataset_dir={Path(t.dataset).resolve()}",
        f"data.train_meta={Path(clean_manifest(wildcards)).resolve()}",
        f"data.nltk_dir={Path(NLTK_DIR).resolve()}",
        f"tracking.uri={TRACKING_URI}",
        *t.overrides,
        *config["train_overrides"],
    ]
    return shlex.join(
        ["--config", t.run_config, *(a for s in sets for a in ("--set", s))]
    )


def tracking_args(wildcards) -> str:
    """`--config C --set tracking.uri=U` for the MLflow bookkeeping script (experiment from the run config)."""
    t = home_target(home_of(wildcards.target))
    return shlex.join(
        ["--config", t.run_config, "--set", f"tracking.uri={TRACKING_URI}"]
    )


def parent_env(wildcards) -> str:
    """Exports the target's parent run id, so every Tracker of the job becomes its child. Read with
    the standard library only: in docker mode this runs on the host."""
    path = shlex.quote(f"{SCRIPTS}/mlflow_steps.py")
    return f'export DECLIP_MLFLOW_PARENT_RUN_ID="$(python3 {path} parent-id {shlex.quote(parent_json(wildcards))})"'


def device_env(wildcards) -> str:
    """Restrict the visible devices (config visible_devices); empty means all."""
    ids = config["visible_devices"]
    if not ids or not is_accelerated(wildcards.target):
        return "true"
    return f"export ASCEND_RT_VISIBLE_DEVICES={ids} CUDA_VISIBLE_DEVICES={ids}"


def omp_threads(wildcards, threads) -> int:
    """Threads per rank: the job's threads split across the processes of this node."""
    return max(1, threads // TARGETS[wildcards.target].devices)


def devices_needed(wildcards) -> int:
    t = TARGETS[wildcards.target]
    return t.devices if t.accelerated else 0


def nltk_args(wildcards) -> str:
    args = [a for s in config["nltk_sources"] for a in ("--from", s)]
    return shlex.join(args + (["--offline"] if config["nltk_offline"] else []))


def launcher(wildcards, resources) -> str:
    """The command that starts `declip train` on every device of the target.

    One device: the plain CLI (no rendezvous, nothing to collide). One node: torchrun; port 0 lets
    torchrun's standalone mode pick a free port. Several nodes (SLURM): one torchrun per node via
    srun, meeting at the first node of the allocation through the c10d rendezvous.
    """
    devices, nodes = TARGETS[wildcards.target].devices, resources.nodes
    if nodes > 1:
        port = config["master_port"] or 29500
        head = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
        srun = "srun --nodes=$SLURM_NNODES --ntasks-per-node=1"
        torchrun = (
            f"{TORCHRUN} --nnodes=$SLURM_NNODES --nproc-per-node={devices} --rdzv-id=$SLURM_JOB_ID "
            f"--rdzv-backend=c10d --rdzv-endpoint={head}:{port} -m declip"
        )
    elif devices == 1:
        srun, torchrun = "", DECLIP
    else:
        srun, port = "", config["master_port"]
        rendezvous = (
            f"--nnodes=1 --master-addr=127.0.0.1 --master-port={port}"
            if port
            else "--standalone"
        )
        torchrun = f"{TORCHRUN} {rendezvous} --nproc-per-node={devices} -m declip"
    return " ".join(
        p for p in (srun, accelerator_run(wildcards), torchrun, "train") if p
    )


# ---------------------------------------------------------------- resources


def npu_devices(wildcards) -> int:
    return devices_needed(wildcards) if config["device_resource"] == "npu" else 0


def gpu_devices(wildcards) -> int:
    return devices_needed(wildcards) if config["device_resource"] == "gpu" else 0


def eval_npu(wildcards) -> int:
    return min(1, npu_devices(wildcards))


def eval_gpu(wildcards) -> int:
    return min(1, gpu_devices(wildcards))


def train_nodes(wildcards) -> int:
    return config["nodes"] if is_accelerated(wildcards.target) else 1


def slurm_gres(wildcards) -> str:
    n = devices_needed(wildcards)
    return f"--gres={config['device_resource']}:{n}" if n else ""


def eval_gres(wildcards) -> str:
    return f"--gres={config['device_resource']}:1" if devices_needed(wildcards) else ""


# SLURM runs a multi-node job's shell on the first node (no srun around it) only for "MPI" jobs;
# the launcher's srun then starts one torchrun per node.
MULTI_NODE = {"mpi": "srun"} if config["nodes"] > 1 else {}

# ---------------------------------------------------------------- docker

# Variables a job sets on the host that the container must see (`-e NAME` copies them when set).
PASS_ENV = (
    "DECLIP_MLFLOW_PARENT_RUN_ID",
    "OMP_NUM_THREADS",
    "MLFLOW_TRACKING_URI",
    "TORCH_DEVICE_BACKEND_AUTOLOAD",
)


def docker_mounts() -> list[str]:
    """The project, outputs, dataset and tracking store, each at its own path (outer folders only)."""
    paths = [
        Path.cwd(),
        Path(workflow.basedir),
        Path(RESULTS),
        Path(RESOURCES),
        Path(config["dataset_dir"]),
    ]
    if TRACKING_URI.startswith("sqlite:///"):
        paths.append(Path(TRACKING_URI.removeprefix("sqlite:///")).parent)
    folders = sorted({p.resolve() for p in paths}, key=lambda p: len(p.parts))
    outer = [
        p
        for i, p in enumerate(folders)
        if not any(p.is_relative_to(q) for q in folders[:i])
    ]
    return [a for p in outer for a in ("-v", f"{p}:{p}")]


def docker_user() -> list[str]:
    """Run as the calling user so outputs stay theirs; the driver's group grants the device nodes."""
    args = ["--user", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp"]
    try:
        args += ["--group-add", str(grp.getgrnam("HwHiAiUser").gr_gid)]
    except KeyError:
        pass
    return args


def docker_devices() -> list[str]:
    if config["device_resource"] == "gpu":
        return ["--gpus", "all", "-e", "CUDA_VISIBLE_DEVICES"]
    if config["docker_ascend_runtime"]:
        return [
            "--runtime",
            "ascend",
            "-e",
            f"ASCEND_VISIBLE_DEVICES={config['visible_devices'] or '0-7'}",
        ]
    # Without the Ascend Docker runtime the container needs the device nodes (all of them:
    # visible_devices narrows them inside) and the host's driver and tools, read-only.
    args = [a for d in config["ascend_device_nodes"] for a in ("--device", d)]
    args += [a for m in config["ascend_host_paths"] for a in ("-v", f"{m}:{m}:ro")]
    return args + ["-e", "ASCEND_RT_VISIBLE_DEVICES"]


def docker_run(accelerated: bool) -> str:
    image = re.sub(r"^docker(-daemon)?://", "", CONTAINER)
    args = [
        "docker",
        "run",
        "--rm",
        "--init",
        "--ipc=host",
        "--network=host",
        *docker_user(),
    ]
    args += docker_devices() if accelerated else []
    args += [*docker_mounts(), "-w", str(Path.cwd())]
    args += [a for name in PASS_ENV for a in ("-e", name)]
    return shlex.join([*args, *config["docker_args"], image])


def container_run(wildcards) -> str:
    """Prefix that runs one command in the image (docker runtime), or nothing."""
    return (
        docker_run(accelerated=False) if config["container_runtime"] == "docker" else ""
    )


def accelerator_run(wildcards) -> str:
    """container_run for commands that use the devices (train, eval): adds the target's devices."""
    if config["container_runtime"] != "docker":
        return ""
    return docker_run(accelerated=is_accelerated(wildcards.target))


# ---------------------------------------------------------------- MLflow parent runs


def end_parent_runs(status: str) -> None:
    """Close the parent runs still open (their files are temporary: present means in progress)."""
    from declip.config import TrackingConfig
    from declip.tracking import end_run

    for home in HOMES:
        path = Path(RESULTS) / home / "mlflow_parent.json"
        if path.is_file():
            run_id = json.loads(path.read_text()).get("run_id")
            if run_id:
                end_run(run_id, status, TrackingConfig(uri=TRACKING_URI))
