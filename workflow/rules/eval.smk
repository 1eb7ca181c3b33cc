# Stage 4: zero-shot classification of the final weights on the val manifest (full-mode targets).


rule zero_shot_eval:
    input:
        parent=ancient(parent_json),
        summary=f"{RESULTS}/{{target}}/train_summary.json",
        meta=val_meta,
    output:
        f"{RESULTS}/{{target}}/eval.json",
    log:
        f"{RESULTS}/{{target}}/logs/zero_shot_eval.log",
    benchmark:
        f"{RESULTS}/{{target}}/benchmarks/zero_shot_eval.tsv"
    wildcard_constraints:
        target=RUN_RE,
    container:
        CONTAINER
    threads: MAX_THREADS
    resources:
        npu=eval_npu,
        gpu=eval_gpu,
        slurm_extra=eval_gres,
    params:
        parent=parent_env,
        devices=device_env,
        declip=declip_on_devices,
        args=run_args,
        run_dir=run_dir,
        track=track_step("zero_shot_eval"),
    shell:
        "({params.parent}; {params.devices}; export OMP_NUM_THREADS={threads}; "
        "{params.declip} eval --checkpoint {params.run_dir}/model.safetensors {params.args} "
        "--out {output} --run-dir {params.run_dir}; "
        "{params.track} --json {output}"
        ") > {log} 2>&1"
