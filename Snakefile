# DeCLIP pre-training and zero-shot evaluation, end to end.
#
#   snakemake --cores 2                  the demo on CPU (default target)
#   snakemake --cores 64 --resources npu=8 full_8p
#
# Per target: mlflow_parent -> setup_nltk, check_data -> train -> zero_shot_eval -> report,
# all under results/<target>/. Targets, config keys and container use: docs/workflow.md.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


shell.executable("bash")


include: "workflow/rules/common.smk"
include: "workflow/rules/setup.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/report.smk"


# Generated demo world, tiny DeCLIP on CPU, zero-shot eval, report (minutes on 2 cores).
rule demo:
    default_target: True
    input:
        target_files("demo"),
    localrule: True


# Seed train_performance_1p.sh: 100 steps on 1 device, FPS.
rule perf_1p:
    input:
        target_files("perf_1p"),
    localrule: True


# Seed train_full_1p.sh: the reference run on 1 device, eval, report.
rule full_1p:
    input:
        target_files("full_1p"),
    localrule: True


# Seed train_performance_8p.sh: 100 steps on 8 devices, FPS.
rule perf_8p:
    input:
        target_files("perf_8p"),
    localrule: True


# Seed train_full_8p.sh: the reference run to 128000 steps on 8 devices, eval, report.
rule full_8p:
    input:
        target_files("full_8p"),
    localrule: True


# Plain CLIP vs DeCLIP vs DeCLIP minus each term on the demo world: one table, one plot.
rule ablation:
    input:
        target_files("ablation"),
    localrule: True


onerror:
    end_parent_runs("FAILED")
