# shellcheck shell=bash
# CANN's environment for every shell of the image (sourced via BASH_ENV and /etc/profile.d).
# The guard keeps nested shells from sourcing it again: they inherit the exported variables.
if [ -z "${DECLIP_ASCEND_ENV:-}" ]; then
    export DECLIP_ASCEND_ENV=1
    for f in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/cann/set_env.sh; do
        if [ -f "$f" ]; then
            # shellcheck source=/dev/null
            . "$f"
            break
        fi
    done
    # The host's driver, mounted at run time (docker -v / apptainer --bind).
    export LD_LIBRARY_PATH="/usr/local/Ascend/driver/lib64/common:/usr/local/Ascend/driver/lib64/driver:${LD_LIBRARY_PATH:-}"
fi
