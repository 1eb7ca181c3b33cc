# Stage 3: train one target. The run folder is results/<target>/ itself: train writes its
# config.yaml, checkpoints/, metrics.jsonl, model.safetensors and, last, train_summary.json there.
# Only the summary is a declared output: Snakemake deletes the outputs of a failed job, and the
# checkpoints must survive a failure so the rerun resumes from checkpoints/latest.pt.


rule train:
    input:
        parent=ancient(parent_json),
        clean=clean_manifest,
        nltk=nltk_summary,
    output:
        f"{RESULTS}/{{target}}/train_summary.json",
    log:
        f"{RESULTS}/{{target}}/logs/train.log",
    benchmark:
        f"{RESULTS}/{{target}}/benchmarks/train.tsv"
    wildcard_constraints:
        target=RUN_RE,
    container:
        CONTAINER
    threads: MAX_THREADS
    resources:
        **MULTI_NODE,
        npu=npu_devices,
        gpu=gpu_devices,
        nodes=train_nodes,
        tasks=train_nodes,
        slurm_extra=slurm_gres,
    params:
        parent=parent_env,
        devices=device_env,
        omp=omp_threads,
        check=script("check_devices", accelerated=True),
        need=devices_needed,
        launch=launcher,
        args=run_args,
        out=run_dir,
    shell:
        "({params.parent}; {params.devices}; export OMP_NUM_THREADS={params.omp}; "
        "{params.check} --target {wildcards.target} --need {params.need}; "
        "{params.launch} {params.args} --out {params.out}"
        ") > {log} 2>&1"
