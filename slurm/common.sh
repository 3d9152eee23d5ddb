# shellcheck shell=bash
# Shared body of slurm/*.sbatch (sourced, not run). One script, two modes:
#
#   outside a Slurm job  -> SUBMIT: builds the sbatch options from environment variables and
#                           submits the calling .sbatch script with the same arguments;
#   inside the batch job -> RUN:    `srun python train.py task=... trainer=... run_name=... "$@"`,
#                           one process per task (= per GPU); Lightning reads its rank, world size
#                           and master address from the Slurm environment (SLURMEnvironment).
#
# Environment variables (all optional):
#   NODES=1             nodes                                   (sbatch --nodes)
#   GPUS_PER_NODE=8     GPUs per node; 0 = CPU-only job         (--gpus-per-node)
#   TASKS_PER_NODE      processes per node (default GPUS_PER_NODE, or 2 when it is 0)
#   CPUS_PER_TASK       CPU cores per process (data-loading workers + 1; default: the
#                       script's #SBATCH value, 1 when GPUS_PER_NODE=0)
#   TIME, PARTITION, ACCOUNT, QOS, JOB_NAME                     (--time, --partition, ...)
#   SBATCH_ARGS         any other sbatch options, e.g. "--exclusive --mem=0"
#   LOG_DIR=slurm/logs  where <job name>-<job id>.out goes (one file per job, requeues append)
#   RUN_NAME            run directory name under runs/<task>/ (default: the job id, or
#                       <array job id>_<task id>; a requeued job keeps its id, so it resumes in
#                       the same directory)
#   TRAINER             trainer config (default: ddp, or ddp_cpu when GPUS_PER_NODE=0; with an
#                       experiment= preset on GPUs, the preset's own trainer; trainer=, task= or
#                       run_name= on the command line win over TRAINER, the script and RUN_NAME)
#   PYTHON              interpreter (default: <repo>/.venv/bin/python if present, else python)
# Plain `sbatch slurm/<script>.sbatch overrides...` also works (the #SBATCH defaults apply;
# sbatch's own SBATCH_* input variables are honoured as usual).

_sapiens_die() {
    echo "slurm/common.sh: $*" >&2
    exit 1
}

# usage: sapiens_slurm_main <path of the .sbatch script> <task or ""> [hydra overrides...]
sapiens_slurm_main() {
    local script="$1" task="$2"
    shift 2
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        _sapiens_submit "$script" "$@"
    else
        _sapiens_run "$task" "$@"
    fi
}

_sapiens_submit() {
    local script="$1"
    shift
    command -v sbatch >/dev/null 2>&1 || _sapiens_die "sbatch not found: run this on a Slurm login node (or start slurm/local_cluster.sh)."
    local repo
    repo="$(cd "$(dirname "$script")/.." && pwd)"
    local gpus="${GPUS_PER_NODE:-8}"
    local default_tasks=$((gpus > 0 ? gpus : 2))
    local tasks="${TASKS_PER_NODE:-$default_tasks}"
    local log_dir="${LOG_DIR:-$repo/slurm/logs}"
    mkdir -p "$log_dir"
    local args=(
        --nodes="${NODES:-1}"
        --ntasks-per-node="$tasks"
        --gpus-per-node="$gpus"
        --chdir="$repo"
        --output="$log_dir/%x-%j.out"
        --export="ALL,SAPIENS_REPO=$repo"
    )
    # CPU-only jobs are for tests and small machines: 1 core per process unless told otherwise.
    local cpus="${CPUS_PER_TASK:-}"
    [[ -z "$cpus" && "$gpus" == 0 ]] && cpus=1
    [[ -n "$cpus" ]] && args+=(--cpus-per-task="$cpus")
    [[ -n "${TIME:-}" ]] && args+=(--time="$TIME")
    [[ -n "${PARTITION:-}" ]] && args+=(--partition="$PARTITION")
    [[ -n "${ACCOUNT:-}" ]] && args+=(--account="$ACCOUNT")
    [[ -n "${QOS:-}" ]] && args+=(--qos="$QOS")
    [[ -n "${JOB_NAME:-}" ]] && args+=(--job-name="$JOB_NAME")
    # shellcheck disable=SC2086  # SBATCH_ARGS is a list of options on purpose
    exec sbatch "${args[@]}" ${SBATCH_ARGS:-} "$script" "$@"
}

_sapiens_run() {
    local task="$1"
    shift
    local repo="${SAPIENS_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
    cd "$repo" || _sapiens_die "cannot enter the repository '$repo'"
    [[ -f train.py ]] || _sapiens_die "no train.py in '$repo'; submit from the repository root."

    local run_name="${RUN_NAME:-}"
    if [[ -z "$run_name" && -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then
        run_name="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    run_name="${run_name:-$SLURM_JOB_ID}"

    # An `experiment=` preset brings its own trainer (e.g. deepspeed_stage_2 for 1b/2b): keep it on
    # GPU jobs unless TRAINER says otherwise. A trainer=, task= or run_name= given on the command
    # line wins over this script's (train.py refuses a key given twice with different values).
    local has_experiment=0 has_trainer=0 has_task=0 has_run_name=0 arg
    for arg in "$@"; do
        [[ "$arg" == experiment=* ]] && has_experiment=1
        [[ "$arg" == trainer=* ]] && has_trainer=1
        [[ "$arg" == task=* ]] && has_task=1
        [[ "$arg" == run_name=* ]] && has_run_name=1
    done
    local trainer="${TRAINER:-}"
    if [[ -z "$trainer" && "$has_trainer" == 0 ]]; then
        if [[ "${GPUS_PER_NODE:-}" == 0 || "${SLURM_GPUS_PER_NODE:-}" == 0 ]]; then
            trainer=ddp_cpu
        elif [[ "$has_experiment" == 0 ]]; then
            trainer=ddp
        fi
    fi
    local python="${PYTHON:-}"
    if [[ -z "$python" ]]; then
        python=python
        [[ -x .venv/bin/python ]] && python=.venv/bin/python
    fi
    local overrides=()
    [[ "$has_run_name" == 0 ]] && overrides+=(run_name="$run_name")
    [[ -n "$trainer" && "$has_trainer" == 0 ]] && overrides=(trainer="$trainer" "${overrides[@]}")
    [[ -n "$task" && "$has_task" == 0 ]] && overrides=(task="$task" "${overrides[@]}")

    echo "[$(date '+%F %T')] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}):" \
        "${SLURM_NNODES:-1} node(s) x ${SLURM_NTASKS_PER_NODE:-?} task(s) on ${SLURM_JOB_NODELIST:-?};" \
        "train.py ${overrides[*]} $*"
    # --kill-on-bad-exit: one crashed rank ends the step instead of leaving the others hanging in
    # a collective. No `exec`: the batch shell stays to print the exit status below.
    local status=0
    srun --kill-on-bad-exit=1 "$python" train.py "${overrides[@]}" "$@" || status=$?
    echo "[$(date '+%F %T')] job ${SLURM_JOB_ID}: srun exited with status $status"
    return "$status"
}
