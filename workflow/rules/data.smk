# Stage 2: validate the training manifest; training reads the clean copy, never the raw one.


rule check_data:
    input:
        parent=ancient(parent_json),
        meta=train_meta,
    output:
        summary=f"{RESULTS}/{{target}}/data_check.json",
        clean=f"{RESULTS}/{{target}}/clean.jsonl",
    log:
        f"{RESULTS}/{{target}}/logs/check_data.log",
    benchmark:
        f"{RESULTS}/{{target}}/benchmarks/check_data.tsv"
    wildcard_constraints:
        target=HOME_RE,
    container:
        CONTAINER
    threads: MAX_THREADS
    params:
        parent=parent_env,
        declip=declip,
        root=train_root,
        out=run_dir,
        decode="--decode" if config["check_decode"] else "",
        track=track_step("check_data"),
    shell:
        "({params.parent}; "
        "{params.declip} check-data --meta {input.meta} --root {params.root} --out {params.out} "
        "--workers {threads} {params.decode}; "
        "{params.track} --json {output.summary}"
        ") > {log} 2>&1"
