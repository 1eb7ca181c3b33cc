# Stage 5: the report of a target (the seed's results table and plots), which also closes the
# target's MLflow parent run; and the ablation table comparing the six demo variants.


rule report:
    input:
        report_inputs,
        parent=ancient(parent_json),
    output:
        md=f"{RESULTS}/{{target}}/report/report.md",
        html=f"{RESULTS}/{{target}}/report/report.html",
    log:
        f"{RESULTS}/{{target}}/logs/report.log",
    benchmark:
        f"{RESULTS}/{{target}}/benchmarks/report.tsv"
    wildcard_constraints:
        target=REPORTED_RE,
    localrule: True
    container:
        CONTAINER
    params:
        parent=parent_env,
        declip=declip,
        run_dir=run_dir,
        uri=TRACKING_URI,
        track=track_step("report"),
        end=end_parent,
    shell:
        "({params.parent}; "
        "{params.declip} report {params.run_dir} --out {params.run_dir}/report --tracking-uri {params.uri}; "
        "{params.track} --artifact {params.run_dir}/report; "
        "{params.end}"
        ") > {log} 2>&1"


rule ablation_table:
    input:
        ablation_evals,
        parent=ancient(parent_json),
    output:
        md=f"{RESULTS}/{{target}}/ablation.md",
        plot=f"{RESULTS}/{{target}}/ablation.png",
        json=f"{RESULTS}/{{target}}/ablation.json",
    log:
        f"{RESULTS}/{{target}}/logs/ablation_table.log",
    benchmark:
        f"{RESULTS}/{{target}}/benchmarks/ablation_table.tsv"
    wildcard_constraints:
        target="ablation",
    localrule: True
    container:
        CONTAINER
    params:
        parent=parent_env,
        table=script("ablation_table"),
        runs=ablation_runs,
        track=track_step("ablation_table"),
        end=end_parent,
    shell:
        "({params.parent}; "
        "{params.table} {params.runs} --out-md {output.md} --out-plot {output.plot} --out-json {output.json}; "
        "{params.track} --json {output.json} --artifact {output.md} --artifact {output.plot}; "
        "{params.end}"
        ") > {log} 2>&1"
