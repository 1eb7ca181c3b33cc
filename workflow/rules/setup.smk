# Stage 1: what every target needs before it touches data: the demo dataset (demo and ablation
# only), the MLflow parent run of the target, and the NLTK corpora that EDA reads.


rule make_demo_data:
    output:
        f"{DEMO_DATA}/demo_manifest.json",
        f"{DEMO_DATA}/{run_config(config['demo_config']).data.train_meta}",
        f"{DEMO_DATA}/{run_config(config['demo_config']).data.val_meta}",
    log:
        f"{RESOURCES}/logs/make_demo_data.log",
    benchmark:
        f"{RESOURCES}/benchmarks/make_demo_data.tsv"
    localrule: True
    container:
        CONTAINER
    params:
        declip=declip,
        out=demo_dir,
    shell:
        "{params.declip} make-demo-data {params.out} > {log} 2>&1"


# Temporary: a later invocation that has work to do opens a new parent; an interrupted one keeps
# its parent, so a resumed chain stays together. `ancient` inputs keep a new parent file from
# making finished steps look outdated.
rule mlflow_parent:
    output:
        temp(f"{RESULTS}/{{target}}/mlflow_parent.json"),
    log:
        f"{RESULTS}/{{target}}/logs/mlflow_parent.log",
    benchmark:
        f"{RESULTS}/{{target}}/benchmarks/mlflow_parent.tsv"
    wildcard_constraints:
        target=HOME_RE,
    localrule: True
    container:
        CONTAINER
    params:
        start=start_parent,
    shell:
        "{params.start} --out {output} > {log} 2>&1"


rule setup_nltk:
    input:
        parent=ancient(parent_json),
    output:
        f"{RESULTS}/{{target}}/setup_nltk.json",
    log:
        f"{RESULTS}/{{target}}/logs/setup_nltk.log",
    benchmark:
        f"{RESULTS}/{{target}}/benchmarks/setup_nltk.tsv"
    wildcard_constraints:
        target=HOME_RE,
    localrule: True
    container:
        CONTAINER
    params:
        parent=parent_env,
        declip=declip,
        nltk_dir=NLTK_DIR,
        sources=nltk_args,
        track=track_step("setup_nltk"),
    shell:
        "({params.parent}; "
        "{params.declip} setup-nltk --data-dir {params.nltk_dir} {params.sources}; "
        "cp {params.nltk_dir}/setup_nltk.json {output}; "
        "{params.track} --json {output}"
        ") > {log} 2>&1"
