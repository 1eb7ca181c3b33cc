"""The Ascend container and the two ways the workflow runs rules in it.

Neither a Docker engine nor Apptainer runs here, so the wiring is proven by what would be executed:
the `docker run` command lines of a dry run, the image Snakemake assigns to every job of the NPU
targets (through its API, with Apptainer as deployment method), and the bind arguments of the
ascend-apptainer profile as Snakemake's own Apptainer command builder renders them.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from test_workflow import REPO, dry_run, seed_dataset  # noqa: F401  (seed_dataset is a fixture)

DOCKERFILE = REPO / "containers/ascend/Dockerfile"
CONFIG = yaml.safe_load((REPO / "config/config.yaml").read_text())
IMAGE = re.sub(r"^docker(-daemon)?://", "", CONFIG["container"])
NPU_TARGETS = ["perf_1p", "full_1p", "perf_8p", "full_8p"]

# docker run options that take a value; everything else starting with "-" is a flag.
VALUED = {"--user", "-e", "-v", "--device", "-w", "--group-add", "--runtime", "--gpus"}


def docker_segments(shell: str) -> list[list[str]]:
    """The `docker run ...` commands inside one job's shell command, as token lists."""
    inner = shell[1 : shell.rindex(")")] if shell.startswith("(") else shell
    return [shlex.split(s) for s in inner.split(";") if s.strip().startswith("docker run")]


def parse_docker(tokens: list[str]) -> dict:
    """Options, image and command of one `docker run` token list."""
    assert tokens[:2] == ["docker", "run"], tokens
    opts: dict[str, list[str]] = {}
    i = 2
    while tokens[i].startswith("-"):
        if tokens[i] in VALUED:
            opts.setdefault(tokens[i], []).append(tokens[i + 1])
            i += 2
        else:
            opts.setdefault(tokens[i], []).append("")
            i += 1
    return {"opts": opts, "image": tokens[i], "command": tokens[i + 1 :]}


def test_hadolint_passes_on_the_dockerfile():
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_a_cann_image_and_a_matching_torch_npu_pair_and_runs_unprivileged():
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)$", text, flags=re.M).group(1)
    # chip, CANN version, OS and Python all named in the tag
    assert re.fullmatch(r"quay\.io/ascend/cann:\d+\.\d+\.\d+-910b-ubuntu\d+\.\d+-py3\.\d+", base), base
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    assert args["TORCH_NPU_VERSION"].split(".post")[0] == args["TORCH_VERSION"]  # torch_npu follows torch's version
    assert "--no-deps ." in text and "-c /etc/pip-constraints.txt" in text
    assert "apex" not in re.sub(r"^#.*$", "", text, flags=re.M)  # only mentioned in comments
    assert re.search(r"^ENV BASH_ENV=/etc/profile\.d/ascend-env\.sh$", text, flags=re.M)
    user = re.findall(r"^USER (\S+)$", text, flags=re.M)[-1]
    assert user not in ("root", "0", "0:0")
    env_script = (REPO / "containers/ascend/ascend-env.sh").read_text()
    assert "/usr/local/Ascend/ascend-toolkit/set_env.sh" in env_script


def test_docker_runtime_runs_every_command_of_the_npu_targets_in_the_image(seed_dataset, tmp_path):  # noqa: F811
    settings = (f"dataset_dir={seed_dataset}", "container_runtime=docker", "visible_devices=0,1,2,3")
    jobs = [job for target in NPU_TARGETS for job in dry_run(target, tmp_path, *settings)]
    assert {j.wildcards.get("target") for j in jobs if j.shell} == set(NPU_TARGETS)
    me = f"{os.getuid()}:{os.getgid()}"
    for job in (j for j in jobs if j.shell):
        inner = job.shell[1 : job.shell.rindex(")")] if job.shell.startswith("(") else job.shell
        runs_python = [s for s in inner.split(";") if re.search(r"python3? |-m declip|torch\.distributed", s)]
        for segment in runs_python:
            if "parent-id" in segment:  # reads the parent run id on the host, standard library only
                continue
            assert segment.strip().startswith("docker run"), f"{job.rule}: runs outside the image: {segment}"
        for tokens in docker_segments(job.shell):
            run = parse_docker(tokens)
            opts = run["opts"]
            assert run["image"] == IMAGE
            assert run["command"][0] == "python3"
            assert opts["--user"] == [me] and "--rm" in opts and "--ipc=host" in opts
            assert opts["-w"] == [str(REPO)]
            assert f"{REPO}:{REPO}" in opts["-v"] and f"{seed_dataset}:{seed_dataset}" in opts["-v"]
            assert f"{tmp_path}/results:{tmp_path}/results" in opts["-v"]
            assert "DECLIP_MLFLOW_PARENT_RUN_ID" in opts["-e"] and "OMP_NUM_THREADS" in opts["-e"]
            uses_devices = (
                " train" in " ".join(run["command"])
                or "check_devices.py" in " ".join(run["command"])
                or (run["command"][1:4] == ["-m", "declip", "eval"])
            )
            if uses_devices:
                assert opts["--device"] == CONFIG["ascend_device_nodes"]
                assert [v for v in opts["-v"] if v.endswith(":ro")] == [
                    f"{p}:{p}:ro" for p in CONFIG["ascend_host_paths"]
                ]
                assert "ASCEND_RT_VISIBLE_DEVICES" in opts["-e"]
            else:
                assert "--device" not in opts, f"{job.rule} needs no NPU: {tokens}"
    train_8p = next(j for j in jobs if j.rule == "train" and j.wildcards["target"] == "full_8p")
    assert "export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3 CUDA_VISIBLE_DEVICES=0,1,2,3" in train_8p.shell
    launch = parse_docker(docker_segments(train_8p.shell)[-1])
    assert launch["command"][:6] == [
        "python3",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=8",
        "-m",
    ]
    try:
        gid = str(grp.getgrnam("HwHiAiUser").gr_gid)
        assert launch["opts"]["--group-add"] == [gid]
    except KeyError:
        assert "--group-add" not in launch["opts"]


def test_ascend_docker_runtime_selects_devices_by_variable_instead_of_mounts(seed_dataset, tmp_path):  # noqa: F811
    jobs = dry_run(
        "perf_8p", tmp_path, f"dataset_dir={seed_dataset}", "container_runtime=docker",
        "docker_ascend_runtime=True", "visible_devices=4,5,6,7",
    )  # fmt: skip
    train = next(j for j in jobs if j.rule == "train")
    launch = parse_docker(docker_segments(train.shell)[-1])
    assert launch["opts"]["--runtime"] == ["ascend"]
    assert "ASCEND_VISIBLE_DEVICES=4,5,6,7" in launch["opts"]["-e"]
    assert "--device" not in launch["opts"] and "ASCEND_RT_VISIBLE_DEVICES" not in launch["opts"]["-e"]


def test_docker_runtime_refuses_an_apptainer_image_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "demo", "--config", "container_runtime=docker", "container=/x/img.sif"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "config key 'container': docker needs an image name, got '/x/img.sif'" in proc.stdout + proc.stderr


# Loads the real workflow through Snakemake's API with Apptainer as deployment method (no apptainer
# binary is needed to build the DAG) and prints, per job, its rule, target, image and command.
DAG_PROBE = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (ConfigSettings, DAGSettings, DeploymentMethod, DeploymentSettings,
                                      OutputSettings, ResourceSettings)
targets, overrides = sys.argv[1].split(","), json.loads(sys.argv[2])
with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
    wf = api.workflow(snakefile=Path("Snakefile"), resource_settings=ResourceSettings(cores=8),
                      config_settings=ConfigSettings(config=overrides),
                      deployment_settings=DeploymentSettings(deployment_method={DeploymentMethod.APPTAINER}))
    wf.dag(DAGSettings(targets=set(targets)))
    workflow = wf._workflow
    workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
    workflow._build_dag()
    print(json.dumps([[j.rule.name, j.wildcards_dict.get("target"), j.container_img_url, j.is_shell]
                      for j in workflow.dag.jobs]))
"""


def test_apptainer_gives_every_job_of_the_npu_targets_the_configured_image(seed_dataset, tmp_path):  # noqa: F811
    overrides = {"dataset_dir": str(seed_dataset), "results_dir": str(tmp_path / "results")}
    proc = subprocess.run(
        [sys.executable, "-c", DAG_PROBE, ",".join(NPU_TARGETS), json.dumps(overrides)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    jobs = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = [j for j in jobs if j[3]]  # jobs with a command; the target rules only collect files
    assert {rule for rule, *_ in jobs if rule not in NPU_TARGETS} == {
        "mlflow_parent", "setup_nltk", "check_data", "train", "zero_shot_eval", "report"
    }  # fmt: skip
    assert len(steps) == 4 * 5 + 2  # five steps per target, eval for the two full targets
    assert all(image == CONFIG["container"] for _, _, image, _ in steps), steps


def test_ascend_apptainer_profile_binds_the_driver_and_caps_npus():
    from snakemake.deployment.singularity import shellcmd

    profile = yaml.safe_load((REPO / "workflow/profiles/ascend-apptainer/config.yaml").read_text())
    assert profile["software-deployment-method"] == "apptainer"
    assert profile["resources"] == ["npu=8"]
    binds = shlex.split(profile["apptainer-args"])
    assert binds[0] == "--bind"
    assert binds[1].split(",") == [f"{p}:{p}:ro" for p in CONFIG["ascend_host_paths"]]
    # What Snakemake would execute for a job under this profile.
    cmd = shellcmd(
        "/images/declip.sif", "python3 -m declip train", args=profile["apptainer-args"], shell_executable="bash"
    )
    assert f"--bind {binds[1]} /images/declip.sif bash -c 'python3 -m declip train'" in cmd
    assert " exec --home " in cmd
