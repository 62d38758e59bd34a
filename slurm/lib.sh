# shellcheck shell=bash
# What train_1node.sbatch, train_multinode.sbatch and sweep.sbatch share: the settings, the
# checks before training, the stop-signal traps, the requeue decision and the job's exit code.
# Sourced by the batch shell (on the job's first node) after `set -uo pipefail`; the settings
# are environment variables, described in slurm/README.md. Each script then calls one of
#
#   one_node_job OPTIONS...          train_1node.sbatch
#   sweep_job GRID OPTIONS...        sweep.sbatch: one line of GRID per array task, on one node
#   multi_node_job OPTIONS...        train_multinode.sbatch
#
# and each of them: job_setup (the job's record, SETUP_FILE, the Python, the settings), the
# checks (options, time limit), start_log, run_and_wait (the training in the background,
# stop signals forwarded to it) and end_job (requeue or not; exit with what happened).

# The toolkit's exit codes (README "Exit codes").
EXIT_BAD_INPUT=2
EXIT_DIVERGED=3
EXIT_PREEMPTED=75

# --------------------------------------------------------------------------------------------
# Stop requests (installed first: a warning may come while the set-up runs)
# --------------------------------------------------------------------------------------------
# bash runs a trap only once the foreground command ends, so the training runs in the
# background and the script waits for it. USR1 (the warning before the time limit, or
# `scancel --batch --signal=USR1`): stop the training, then requeue. TERM (scancel, preemption,
# the time limit itself): stop it and let SLURM decide (a requeue here would bring a cancelled
# job back). The training is stopped with one STOP_WITH signal to CHILD: SIGTERM to a launcher
# (which forwards it once to its workers), SIGUSR2 to srun (see multi_node_job).
STOP=""
CHILD=""
STOP_WITH=TERM
SIGNALLED=""
on_stop_signal() {
    SIGNALLED=1
    if [[ -n $STOP ]]; then
        log "SIG$1 again: still waiting for the training to save"
        return
    fi
    STOP=$1
    if [[ $1 == USR1 ]]; then
        log "SIGUSR1 (time limit near, or scancel --signal=USR1): stopping the training to requeue"
    else
        log "SIGTERM (cancelled, preempted or out of time): stopping the training; no requeue"
    fi
    if [[ -n $CHILD ]]; then
        kill -"$STOP_WITH" "$CHILD" 2>/dev/null
    fi
}
trap 'on_stop_signal USR1' USR1
trap 'on_stop_signal TERM' TERM

wait_for_child() { # until CHILD has exited, whatever traps run meanwhile; sets CHILD_RC
    local rc
    SIGNALLED=""
    wait "$CHILD"
    rc=$?
    # A trap cut `wait` short (status > 128): wait again, for the child's own status.
    while [[ -n $SIGNALLED ]]; do
        SIGNALLED=""
        wait "$CHILD"
        rc=$?
    done
    CHILD_RC=$rc
}

# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------
# printf's own clock, not `date`: SLURM's SIGTERM goes to every process of the job, and would
# kill a `date` started by a trap at that moment.
log() { printf '[%(%F %T)T %s] %s\n' -1 "job ${JOB_REF:-${SLURM_JOB_ID:-?}}" "$*"; }

refuse() { # a setting or an option the job cannot run with: one line, exit 2, not requeued
    log "error: $*" >&2
    exit "$EXIT_BAD_INPUT"
}

use_cpu() { # ACCELERATE_USE_CPU set to true, read as accelerate reads it
    local flag=${ACCELERATE_USE_CPU:-}
    [[ ${flag,,} =~ ^(1|y|yes|t|true|on)$ ]]
}

# --------------------------------------------------------------------------------------------
# The job and its settings
# --------------------------------------------------------------------------------------------
# JOB_REF names this job to scontrol. For an array task it must be ARRAYID_TASKID: the task
# whose own id equals the array's id would otherwise stand for every task of the array
# (`scontrol requeue ARRAYID` requeues them all, `scontrol show job ARRAYID` shows them all).
if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    JOB_REF=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
else
    JOB_REF=${SLURM_JOB_ID:-local}
fi

job_field() { # NAME: a field of `scontrol show job` for this job (read once, in job_setup)
    sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p" <<<" ${JOB_RECORD:-}" | head -n 1
}

source_setup_file() { # SETUP_FILE: module loads, conda or venv activation
    [[ -n ${SETUP_FILE:-} ]] || return 0
    [[ -f $SETUP_FILE && -r $SETUP_FILE ]] || refuse "SETUP_FILE=$SETUP_FILE: no such file"
    local status
    # Activation scripts often read unset variables: no `set -u` while one runs.
    set +u
    # shellcheck disable=SC1090  # the user's file
    source "$SETUP_FILE"
    status=$?
    set -u
    ((status == 0)) || refuse "SETUP_FILE=$SETUP_FILE failed (exit status $status)"
}

whole_number() { # NAME VALUE: VALUE must be a whole number >= 0
    [[ $2 =~ ^[0-9]+$ ]] || refuse "$1=$2: expected a whole number >= 0"
}

job_setup() { # DEFAULT_MAX_RESTARTS
    JOB_RECORD=$(scontrol show job "$JOB_REF" 2>/dev/null || true)
    source_setup_file
    PYTHON=${PYTHON:-python}
    command -v "$PYTHON" >/dev/null ||
        refuse "PYTHON=$PYTHON: not found (activate the environment in SETUP_FILE, or set PYTHON)"
    # The launcher runs as `$PYTHON -m accelerate.commands.launch`, so that it and the training
    # processes it starts (its own sys.executable) are the same Python.
    "$PYTHON" -c 'import importlib.util as u, sys
sys.exit(0 if u.find_spec("fmnist_accel") and u.find_spec("accelerate") else 1)' ||
        refuse "$PYTHON cannot import fmnist_accel and accelerate: activate the environment" \
            "that has them (in SETUP_FILE, or before sbatch), or set PYTHON"

    MAX_REQUEUES=${MAX_REQUEUES:-3}
    # torchrun's restarts of a failed group: the multi-node script's default, as issue 13 asks;
    # one node: none (gloo's restarts on one node often fail to connect in torch 2.14).
    MAX_RESTARTS=${MAX_RESTARTS:-$1}
    START_MARGIN=${START_MARGIN:-60}
    whole_number MAX_REQUEUES "$MAX_REQUEUES"
    whole_number MAX_RESTARTS "$MAX_RESTARTS"
    whole_number START_MARGIN "$START_MARGIN"
    RESTARTS=${SLURM_RESTART_COUNT:-0}
    OUTPUT_DIR=${OUTPUT_DIR:-runs}
    RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-fmnist}-${SLURM_JOB_ID:-local}}
    # Below the kernel's ephemeral ports (32768-60999 by default), which it hands out to
    # outgoing connections: a port from there may be taken by then. From the job id, so that
    # jobs sharing a node differ.
    PORT=${MAIN_PROCESS_PORT:-$((15000 + ${SLURM_JOB_ID:-0} % 10000))}
    whole_number MAIN_PROCESS_PORT "$PORT"
    LAUNCH_ARGS=${LAUNCH_ARGS:-}
    # The log, where the launcher reports a failed worker's exit code (worker_exit_code).
    STDERR_FILE=$(job_field StdErr)
    STDERR_OFFSET=0
    if [[ -f $STDERR_FILE ]]; then
        STDERR_OFFSET=$(stat -c %s "$STDERR_FILE" 2>/dev/null || echo 0)
    fi
}

processes_per_node() { # NUM_PROCESSES, else the GPUs SLURM gave, else nvidia-smi's, else 1
    local n
    if [[ -n ${NUM_PROCESSES:-} ]]; then
        n=$NUM_PROCESSES
    elif use_cpu; then
        n=1
    elif [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then
        n=$SLURM_GPUS_ON_NODE
    else
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [[ ${n:-0} =~ ^[0-9]+$ && $n -ge 1 ]] || n=1
    echo "$n"
}

check_run_options() { # the training options: the script names the run folder itself
    local arg
    for arg in "$@"; do
        case $arg in
        --output-dir | --output-dir=* | --run-name | --run-name=* | --resume | --resume=*)
            refuse "${arg%%=*} among the training options: the script sets it (it reads the" \
                "run's summary.json to decide what to do); use OUTPUT_DIR and RUN_NAME instead"
            ;;
        esac
    done
}

port_note() { # a note when PORT lies in this node's ephemeral range after all
    local low high
    read -r low high </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || return 0
    if ((PORT >= low && PORT <= high)); then
        log "note: port $PORT is in this node's ephemeral port range ($low-$high); if the" \
            "processes cannot meet, set MAIN_PROCESS_PORT to a port outside it"
    fi
}

# --------------------------------------------------------------------------------------------
# The time limit
# --------------------------------------------------------------------------------------------
to_seconds() { # SLURM's [D-]HH:MM:SS -> seconds; nothing for UNLIMITED and the like
    [[ $1 =~ ^(([0-9]+)-)?([0-9]+):([0-9]+):([0-9]+)$ ]] || return 0
    echo $(((10#${BASH_REMATCH[2]:-0} * 24 + 10#${BASH_REMATCH[3]}) * 3600 +
        10#${BASH_REMATCH[4]} * 60 + 10#${BASH_REMATCH[5]}))
}

warning_lead() { # WARNING_LEAD, else the @N of this script's own `#SBATCH --signal=...@N`
    local lead=${WARNING_LEAD:-}
    if [[ -z $lead && -r $0 ]]; then
        lead=$(sed -n 's/^#SBATCH[[:space:]]\{1,\}--signal=[^@]*@\([0-9]\{1,\}\).*/\1/p' "$0" |
            head -n 1)
    fi
    echo "${lead:-60}" # SLURM's own lead when --signal has no @N
}

check_time_limit() {
    # A job warned before it could start and save is not requeued (end_job): refuse a limit
    # that makes that certain at once, saying why, rather than waste the slot.
    TIME_LIMIT=$(job_field TimeLimit)
    WARNING_S=$(warning_lead)
    whole_number WARNING_LEAD "$WARNING_S"
    local limit_s
    limit_s=$(to_seconds "$TIME_LIMIT")
    [[ -n $limit_s ]] || return 0
    if ((limit_s < WARNING_S + START_MARGIN)); then
        refuse "time limit $TIME_LIMIT is shorter than the warning's lead ($WARNING_S s) plus" \
            "START_MARGIN ($START_MARGIN s) to start and save: the training would be warned" \
            "before it could save anything; ask for" \
            "--time=$(((WARNING_S + START_MARGIN + 59) / 60)) or more"
    fi
}

# --------------------------------------------------------------------------------------------
# The run's files, before and after
# --------------------------------------------------------------------------------------------
run_files_state() { # "RESUME_ID SUMMARY_ID STATUS" of RUN_DIR ("-" for what is missing)
    # A file's identity is its inode, size and modification time: every save of resume.pt and
    # summary.json is a new file renamed over the old one. Each file is opened before fstat, so
    # that NFS revalidates it (close-to-open) instead of answering from its attribute cache:
    # with several nodes, the process that writes may run on another node.
    "$PYTHON" - "$RUN_DIR" <<'EOF'
import json, os, sys

def identity(path):
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "-"

run_dir = sys.argv[1]
try:
    with open(os.path.join(run_dir, "summary.json")) as f:
        status = str(json.load(f).get("status") or "-")
except (OSError, ValueError, AttributeError):
    status = "-"
resume, summary = (identity(os.path.join(run_dir, n)) for n in ("resume.pt", "summary.json"))
print(resume, summary, status.replace(" ", "_"))
EOF
}

worker_exit_code() { # the exit code of the first failed worker in the launcher's report
    # torchrun exits 1 whatever its workers exited with; its report ("Root Cause (first
    # observed failure): ... exitcode : 2") is in this start's part of the job's log.
    [[ -f $STDERR_FILE ]] || return 0
    tail -c +"$((STDERR_OFFSET + 1))" "$STDERR_FILE" 2>/dev/null | awk '
        /Root Cause/ { root = 1 }
        root && match($0, /exitcode *: *-?[0-9]+/) {
            code = substr($0, RSTART, RLENGTH); sub(/.*: */, "", code); print code; exit
        }'
}

status_exit_code() { # STATUS: the job's exit code for a run's status (nothing if unknown)
    case $1 in
    completed | early-stopped) echo 0 ;;
    diverged) echo "$EXIT_DIVERGED" ;;
    preempted) echo "$EXIT_PREEMPTED" ;;
    esac
}

exit_meaning() {
    case $1 in
    0) echo "the run has ended (completed or early-stopped)" ;;
    "$EXIT_BAD_INPUT") echo "bad input: an option, a data file or a setting (see above)" ;;
    "$EXIT_DIVERGED") echo "diverged: a non-finite loss stopped the training" ;;
    "$EXIT_PREEMPTED") echo "stopped with its state saved: RUN_NAME=$RUN_NAME resumes it" ;;
    138 | 143) echo "stopped by SIG$(kill -l $(($1 - 128))) before it saved anything" ;;
    *) echo "failed: see the messages above" ;;
    esac
}

# --------------------------------------------------------------------------------------------
# A start: its first lines, the training, its end
# --------------------------------------------------------------------------------------------
start_log() { # LAYOUT...: the start's first lines
    log "==== start $((RESTARTS + 1)) ($( ((RESTARTS == 0)) && echo "first start" ||
        echo "requeue $RESTARTS") of at most $MAX_REQUEUES; SLURM_RESTART_COUNT=$RESTARTS) ===="
    log "$*"
    log "time limit ${TIME_LIMIT:-unknown}; warning (SIGUSR1) ${WARNING_S:-?} s before it"
    log "run folder: $RUN_DIR ($([[ -f $RUN_DIR/resume.pt ]] && echo 'has saved state: resuming' ||
        echo 'new run'))"
}

run_and_wait() { # CMD...: the training (or srun) in the background, waited for
    START_STATE=$(run_files_state)
    if [[ -n $STOP ]]; then
        log "the stop signal came during the set-up: the training is not started"
        CHILD_RC=$((128 + $(kill -l "$STOP")))
        return
    fi
    "$@" &
    CHILD=$!
    wait_for_child
}

end_job() { # requeue or not, then exit with a code that says what happened
    local resume_then summary_then resume_now summary_now status_now _
    read -r resume_then summary_then _ <<<"$START_STATE"
    read -r resume_now summary_now status_now <<<"$(run_files_state)"
    # What this start did, and nothing older: an earlier start's summary.json must not decide.
    local new_status="" saved=""
    [[ $summary_now != - && $summary_now != "$summary_then" ]] && new_status=$status_now
    [[ $resume_now != - && $resume_now != "$resume_then" ]] && saved=1
    log "training exited with code $CHILD_RC; this start saved $([[ -n $saved ]] &&
        echo "new state" || echo "no new state"); run status: ${new_status:-none written by this start}"

    local code worker
    if [[ -n $new_status && -n $(status_exit_code "$new_status") ]]; then
        code=$(status_exit_code "$new_status")
    elif [[ -z $STOP && $CHILD_RC == 0 ]]; then
        code=$(status_exit_code "$status_now") # the run had ended before: "already ended"
        code=${code:-0}
    elif worker=$(worker_exit_code) && [[ -n $worker ]]; then
        code=$worker
        ((code < 0)) && code=$((128 - code)) # torchrun's -N: killed by signal N
    elif [[ -n $STOP && -n $saved ]]; then
        code=$EXIT_PREEMPTED
    elif [[ -n $STOP ]]; then
        code=$((128 + $(kill -l "$STOP"))) # stopped before it saved anything
    else
        code=$CHILD_RC
    fi

    if [[ $STOP == USR1 ]]; then
        if [[ -n $new_status && $new_status != preempted ]]; then
            log "not requeued: the run has ended ($new_status)"
        elif [[ -z $saved ]]; then
            log "not requeued: this start saved no new state (warned before it could, or the" \
                "save failed: see above), and a job that cannot progress must not loop;" \
                "resubmit with RUN_NAME=$RUN_NAME once the cause is fixed"
        elif ((RESTARTS >= MAX_REQUEUES)); then
            log "not requeued: the requeue limit is reached ($RESTARTS requeues," \
                "MAX_REQUEUES=$MAX_REQUEUES); resubmit with RUN_NAME=$RUN_NAME (and a longer" \
                "--time, or a larger MAX_REQUEUES) to go on"
        else
            log "requeueing $JOB_REF (requeue $((RESTARTS + 1)) of at most $MAX_REQUEUES):" \
                "the next start resumes $RUN_DIR"
            STOP=requeued
            # Last: the requeue ends this start. The job goes back to PENDING with its id, and
            # so its run folder.
            if scontrol requeue "$JOB_REF"; then
                exit "$EXIT_PREEMPTED"
            fi
            log "scontrol requeue failed: resubmit with RUN_NAME=$RUN_NAME to resume"
        fi
    fi
    log "job exit code $code: $(exit_meaning "$code")"
    exit "$code"
}

# --------------------------------------------------------------------------------------------
# One node: train_1node.sbatch, and each task of sweep.sbatch
# --------------------------------------------------------------------------------------------
one_node_job() { # TRAINING_OPTIONS...
    job_setup 0
    one_node_start "$@"
}

one_node_start() {
    check_run_options "$@"
    check_time_limit
    RUN_DIR=$OUTPUT_DIR/$RUN_NAME
    local nproc train cmd
    nproc=$(processes_per_node)
    train=(-m fmnist_accel.train --output-dir "$OUTPUT_DIR" --run-name "$RUN_NAME" --resume auto
        "$@")
    if ((nproc > 1)); then
        # shellcheck disable=SC2206  # LAUNCH_ARGS is a list of options: split it into words
        cmd=("$PYTHON" -m accelerate.commands.launch --multi_gpu --num_machines 1
            --num_processes "$nproc" --main_process_port "$PORT" --max_restarts "$MAX_RESTARTS"
            $LAUNCH_ARGS "${train[@]}")
    else
        # One process: no launcher. accelerate's single-process launcher does not pass SIGTERM
        # on to the training, which would then be killed without saving.
        cmd=("$PYTHON" "${train[@]}")
    fi
    start_log "nodes: 1 (${SLURM_JOB_NODELIST:-$(hostname -s)}); processes: $nproc on" \
        "$(use_cpu && echo CPU || echo GPU) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset});" \
        "port $PORT"
    ((nproc > 1)) && port_note
    log "command: ${cmd[*]}"
    STOP_WITH=TERM
    run_and_wait "${cmd[@]}"
    end_job
}

# --------------------------------------------------------------------------------------------
# Sweeps: sweep.sbatch, one grid line per array task
# --------------------------------------------------------------------------------------------
grid_line() { # GRID TASK -> three lines: the number of option lines, a name, the options quoted
    "$PYTHON" - "$1" "$2" <<'EOF'
import re, shlex, sys

path, task = sys.argv[1], int(sys.argv[2])
try:
    with open(path) as f:
        lines = [w for w in (shlex.split(line, comments=True) for line in f) if w]
except (OSError, UnicodeDecodeError, ValueError) as exc:
    sys.exit(f"grid file {path}: {exc}")
if not 1 <= task <= len(lines):
    sys.exit(f"array task {task}, but {path} has {len(lines)} option lines, numbered from 1: "
             f"submit with --array=1-{len(lines)}")
words = lines[task - 1]
# The run folder's name says what the line changes: "--model cnn --lr 1e-3" -> model-cnn-lr-1e-3
name = re.sub(r"[^A-Za-z0-9._-]+", "-", " ".join(w.lstrip("-") for w in words))
print(len(lines))
print(name.strip("-.")[:60].rstrip("-."))
print(" ".join(shlex.quote(w) for w in words))
EOF
}

sweep_job() { # GRID TRAINING_OPTIONS...: the options common to every line follow the grid
    job_setup 0
    local grid=${1:-}
    [[ -n $grid ]] ||
        refuse "usage: sbatch --array=1-N slurm/sweep.sbatch GRID_FILE [TRAINING_OPTIONS...]"
    shift
    [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] ||
        refuse "not an array task: submit with --array=1-N, N the number of lines in $grid"
    local sweep=${SWEEP_NAME:-$(basename "${grid%.*}")}
    [[ $sweep =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
        refuse "SWEEP_NAME=$sweep: letters, digits and . _ - only"
    local parsed count name quoted
    parsed=$(grid_line "$grid" "$SLURM_ARRAY_TASK_ID" 2>&1) || refuse "$parsed"
    {
        read -r count
        read -r name
        read -r quoted
    } <<<"$parsed"
    local line_options
    eval "line_options=($quoted)" # shlex.quote'd words: safe to evaluate
    check_run_options "${line_options[@]}"
    # Named from the sweep and the line, not the job id: a requeued task, or the same sweep
    # submitted again, resumes its own run.
    RUN_NAME=$sweep-$SLURM_ARRAY_TASK_ID${name:+-$name}
    log "sweep $sweep: task $SLURM_ARRAY_TASK_ID of $count lines in $grid: ${line_options[*]}"
    # The line comes last: its options win over the common ones.
    one_node_start "$@" "${line_options[@]}"
}

# --------------------------------------------------------------------------------------------
# Several nodes: train_multinode.sbatch
# --------------------------------------------------------------------------------------------
head_address() { # this node's address for the others: SLURM's NodeAddr for it, resolved here
    local node addr
    node=$(hostname -s)
    addr=$(scontrol show node "$node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' |
        head -n 1)
    if [[ -n $addr && ! $addr =~ ^[0-9.]+$ ]]; then # a name: its address, not a loopback one
        addr=$(getent ahostsv4 "$addr" 2>/dev/null | awk '$1 !~ /^127\./ { print $1; exit }')
    fi
    [[ -n $addr ]] || addr=$(hostname -I 2>/dev/null | awk '{ print $1 }')
    echo "${addr:-$node}"
}

# node_main runs on every machine (one srun task each), in a new bash that gets this
# function's text: the batch shell's environment (srun --export=ALL) carries the FMNIST_*
# values. It sources SETUP_FILE, starts the machine's launcher and forwards stop requests:
#   - SIGUSR2: the batch script's stop request. SLURM passes a signal sent to srun to every
#     process of the step, so the request travels as a signal that only this shell acts on
#     (the launcher and its workers are started with SIGUSR2 ignored);
#   - SIGTERM: scancel, preemption or the time limit (SLURM signals every process of the
#     step). Without this trap the shell would die at once and, where SLURM tracks processes
#     with cgroups, the step would end and its launcher and workers be SIGKILLed mid-save.
# Either way: one SIGTERM to the launcher, which stops its workers (they finish the step and
# save, allowed TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s, before it kills them), and the shell
# keeps waiting for it. After a stop it exits 0: each launcher then exits 1, and srun's
# --kill-on-bad-exit would kill the other machines while the main process writes summary.json.
node_main() {
    local rank=$SLURM_PROCID host
    host=$(hostname -s) # once: a command run from a trap may be killed by SLURM's SIGTERM
    node_log() { echo "machine $rank ($host): $*"; }
    if [[ -n ${SETUP_FILE:-} ]]; then
        # shellcheck disable=SC1090  # the user's file
        source "$SETUP_FILE" || {
            node_log "error: SETUP_FILE=$SETUP_FILE failed"
            exit 2
        }
    fi
    if ((FMNIST_PROCESSES_TOTAL > 1)); then
        local is_host=()
        # The rendezvous store runs on machine 0, the batch script's node, whose address the
        # others are given (torch's own guess compares host names, and misses some addresses).
        if [[ -n $FMNIST_SET_HOST ]]; then
            is_host=(--rdzv_conf "is_host=$( ((rank == 0)) && echo 1 || echo 0)")
        fi
        # shellcheck disable=SC2086  # LAUNCH_ARGS is a list of options
        set -- "$FMNIST_PYTHON" -m accelerate.commands.launch --multi_gpu \
            --num_machines "$FMNIST_MACHINES" --machine_rank "$rank" \
            --num_processes "$FMNIST_PROCESSES_TOTAL" --main_process_ip "$FMNIST_HEAD_ADDR" \
            --main_process_port "$FMNIST_PORT" --rdzv_backend c10d "${is_host[@]}" \
            --max_restarts "$FMNIST_MAX_RESTARTS" $FMNIST_LAUNCH_ARGS "$@"
    else
        set -- "$FMNIST_PYTHON" "$@" # one process in all: no launcher (see one_node_start)
    fi
    node_log "$*"
    STOP=""
    # shellcheck disable=SC2329  # called by the traps below
    node_stop() {
        SIGNALLED=1
        [[ -n $STOP ]] && return
        STOP=$1
        if [[ $1 == USR2 ]]; then
            node_log "stop requested by the batch script: SIGTERM to the launcher"
        else
            node_log "SIGTERM (scancel, preemption or time limit): SIGTERM to the launcher"
        fi
        kill -TERM "$CHILD" 2>/dev/null
    }
    trap 'node_stop TERM' TERM
    trap 'node_stop USR2' USR2
    (
        trap '' USR2
        exec "$@"
    ) &
    CHILD=$!
    wait_for_child
    [[ -n $STOP ]] && exit 0
    exit "$CHILD_RC"
}

multi_node_job() { # TRAINING_OPTIONS...
    job_setup 3
    check_run_options "$@"
    check_time_limit
    RUN_DIR=$OUTPUT_DIR/$RUN_NAME
    local nproc nodes per_node machines
    nproc=$(processes_per_node)
    nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    # MACHINES_PER_NODE > 1 starts several launchers per node: the tests' way to run the
    # several-machine path (rendezvous, ranks, stop requests) on a one-node cluster.
    per_node=${MACHINES_PER_NODE:-1}
    whole_number MACHINES_PER_NODE "$per_node"
    ((per_node >= 1)) || refuse "MACHINES_PER_NODE=0: expected 1 or more"
    machines=$((nodes * per_node))
    # What node_main reads (srun passes the environment on).
    export FMNIST_MACHINES=$machines
    export FMNIST_PROCESSES_TOTAL=$((nproc * machines))
    if [[ -n ${MAIN_PROCESS_IP:-} ]]; then
        export FMNIST_HEAD_ADDR=$MAIN_PROCESS_IP FMNIST_SET_HOST="" # torch finds the host
    else
        FMNIST_HEAD_ADDR=$(head_address)
        export FMNIST_HEAD_ADDR FMNIST_SET_HOST=1
    fi
    export FMNIST_PORT=$PORT
    export FMNIST_MAX_RESTARTS=$MAX_RESTARTS
    # torch 2.14 hands a restarted group the launcher's old rendezvous store, where restarted
    # gloo ranks find their dead peers' addresses (connectFullMesh refused): a fresh store per
    # restart avoids it (docs/faults.md).
    if ((MAX_RESTARTS > 0)); then export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; fi
    export FMNIST_LAUNCH_ARGS=$LAUNCH_ARGS
    export FMNIST_PYTHON=$PYTHON
    export SETUP_FILE=${SETUP_FILE:-}
    local train srun
    train=(-m fmnist_accel.train --output-dir "$OUTPUT_DIR" --run-name "$RUN_NAME" --resume auto
        "$@")
    # --export=ALL: a site's SBATCH_EXPORT=NONE reaches srun as SLURM_EXPORT_ENV=NONE, which
    # would start the tasks without this environment.
    srun=(srun --export=ALL --label --nodes="$nodes" --ntasks="$machines"
        --ntasks-per-node="$per_node" --kill-on-bad-exit=1)
    # srun does not take --cpus-per-task from the job in SLURM 22.05: give it explicitly.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        local cpus=$((SLURM_CPUS_PER_TASK / per_node))
        srun+=(--cpus-per-task="$((cpus > 0 ? cpus : 1))")
    fi
    start_log "nodes: $nodes (${SLURM_JOB_NODELIST:-$(hostname -s)}); machines (launchers):" \
        "$machines; head: $(hostname -s) (rendezvous $FMNIST_HEAD_ADDR:$PORT, c10d);" \
        "processes: $nproc per machine, $FMNIST_PROCESSES_TOTAL in all, on" \
        "$(use_cpu && echo CPU || echo GPU); torchrun restarts a failed group up to" \
        "$MAX_RESTARTS times"
    ((FMNIST_PROCESSES_TOTAL > 1)) && port_note
    log "command: ${srun[*]} bash -c node_main ${train[*]}"
    STOP_WITH=USR2
    run_and_wait "${srun[@]}" bash -c "$(declare -f node_main wait_for_child)
node_main \"\$@\"" node "${train[@]}"
    end_job
}
