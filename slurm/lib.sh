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

# The job's exit codes (slurm/README.md, "Exit codes"): the toolkit's own, and one for a start
# stopped before it saved anything. None is 128 or above: accounting (sacct) shows such a code
# as a signal number (138 as 10), and a job's code must read the same everywhere.
EXIT_FAILED=1
EXIT_BAD_INPUT=2
EXIT_DIVERGED=3
EXIT_PEER_FAILED=4
EXIT_WRITE_FAILED=74
EXIT_PREEMPTED=75
EXIT_STOPPED_UNSAVED=79

# --------------------------------------------------------------------------------------------
# Stop requests (installed first: a warning may come while the set-up runs)
# --------------------------------------------------------------------------------------------
# bash runs a trap only once the foreground command ends, so the training runs in the
# background (an srun step) and the script waits for it. USR1 (the warning before the time
# limit, or `scancel --batch --signal=USR1`): stop the training, then requeue. TERM (scancel,
# preemption, the time limit itself): stop it and let SLURM decide (a requeue here would bring
# a cancelled job back; SLURM requeues a preempted job itself). Either way the request goes to
# the step as SIGUSR2, which only the step's shells act on (node_main): each sends one stop
# signal to its training processes.
STOP=""
CHILD=""
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
    forward_stop
}
trap 'on_stop_signal USR1' USR1
trap 'on_stop_signal TERM' TERM

# The request goes to the step again every 2 s until the step has ended: srun drops a signal
# that comes before its tasks have started (a warning right at the start, a slow srun), and
# node_main counts every copy as the one request.
FORWARDER=""
forward_stop() {
    [[ -n $STOP && -n $CHILD && -z $FORWARDER ]] || return 0
    (while kill -USR2 "$CHILD" 2>/dev/null; do sleep 2; done) &
    FORWARDER=$!
}

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

# The job's chain of starts, kept in its Comment (the same job id across requeues):
# TIME_REQUEUES, the requeues this script made for SIGUSR1, the time-limit warning's signal
# (what MAX_REQUEUES bounds), and IDLE_STARTS, the starts in a row that saved nothing (MAX_STARTS_WITHOUT_PROGRESS
# bounds them). SLURM's own requeues (a preemption, a node failure: SLURM_RESTART_COUNT counts
# every requeue) spend neither.
read_chain() {
    local comment
    comment=$(job_field Comment)
    TIME_REQUEUES=0
    IDLE_STARTS=0
    if [[ $comment =~ fmnist:time=([0-9]+),idle=([0-9]+) ]]; then
        TIME_REQUEUES=${BASH_REMATCH[1]}
        IDLE_STARTS=${BASH_REMATCH[2]}
    fi
    CHAIN_READ="$TIME_REQUEUES,$IDLE_STARTS"
}

write_chain() { # when the counts changed
    [[ "$TIME_REQUEUES,$IDLE_STARTS" != "${CHAIN_READ:-}" ]] || return 0
    scontrol update JobId="$JOB_REF" Comment="fmnist:time=$TIME_REQUEUES,idle=$IDLE_STARTS" \
        2>/dev/null || log "note: could not record the job's requeue counts in its Comment"
    CHAIN_READ="$TIME_REQUEUES,$IDLE_STARTS"
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
    if [[ -n $STOP ]]; then # the time limit or a cancel came while it ran: not bad input
        log "SIG$STOP while SETUP_FILE=$SETUP_FILE ran: the training is not started"
        log "job exit code $EXIT_STOPPED_UNSAVED: $(exit_meaning "$EXIT_STOPPED_UNSAVED")"
        exit "$EXIT_STOPPED_UNSAVED"
    fi
    ((status == 0)) || refuse "SETUP_FILE=$SETUP_FILE failed (exit status $status)"
}

whole_number() { # NAME VALUE: VALUE must be a whole number >= 0
    [[ $2 =~ ^[0-9]+$ ]] || refuse "$1=$2: expected a whole number >= 0"
}

job_setup() { # DEFAULT_MAX_RESTARTS
    JOB_RECORD=$(scontrol show job "$JOB_REF" 2>/dev/null || true)
    source_setup_file
    PYTHON=${PYTHON:-python}
    local found
    found=$(command -v "$PYTHON") ||
        refuse "PYTHON=$PYTHON: not found (activate the environment in SETUP_FILE, or set PYTHON)"
    # Resolved once, here, to an absolute path: every node runs this very interpreter (a venv's
    # python is a link into the venv: the path is kept, not the link's target).
    [[ $found == /* ]] || found="$(cd "$(dirname "$found")" && pwd)/$(basename "$found")"
    PYTHON=$found
    # The launcher runs as `$PYTHON -m accelerate.commands.launch`, so that it and the training
    # processes it starts (its own sys.executable) are the same Python.
    "$PYTHON" -c 'import importlib.util as u, sys
sys.exit(0 if u.find_spec("fmnist_accel") and u.find_spec("accelerate") else 1)' ||
        refuse "$PYTHON cannot import fmnist_accel and accelerate: activate the environment" \
            "that has them (in SETUP_FILE, or before sbatch), or set PYTHON"

    MAX_REQUEUES=${MAX_REQUEUES:-3}
    MAX_STARTS_WITHOUT_PROGRESS=${MAX_STARTS_WITHOUT_PROGRESS:-2}
    # torchrun's restarts of a failed group: 3 on several nodes; none on one node, where a
    # requeue does the same job.
    MAX_RESTARTS=${MAX_RESTARTS:-$1}
    START_MARGIN=${START_MARGIN:-60}
    whole_number MAX_REQUEUES "$MAX_REQUEUES"
    whole_number MAX_STARTS_WITHOUT_PROGRESS "$MAX_STARTS_WITHOUT_PROGRESS"
    whole_number MAX_RESTARTS "$MAX_RESTARTS"
    whole_number START_MARGIN "$START_MARGIN"
    RESTARTS=${SLURM_RESTART_COUNT:-0}
    read_chain
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
    # torchrun waits this long for its processes to save before it kills them, when it stops
    # them itself (a process failed): the warning's lead, less time to exit, bounds the save.
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$((WARNING_S > 60 ? WARNING_S - 30 : 30))
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
run_files_state() { # "RESUME_ID SUMMARY_ID STATUS ENDING STOPPED_BY" of RUN_DIR ("-": missing)
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
        summary = json.load(f)
    fields = [str(summary.get(k) or "-") for k in ("status", "ending", "stopped_by")]
except (OSError, ValueError, AttributeError):
    fields = ["-", "-", "-"]
resume, summary = (identity(os.path.join(run_dir, n)) for n in ("resume.pt", "summary.json"))
print(resume, summary, *(f.replace(" ", "_") for f in fields))
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
    write-failed) echo "$EXIT_WRITE_FAILED" ;;
    esac
}

exit_meaning() {
    case $1 in
    0) echo "the run has ended (completed or early-stopped)" ;;
    "$EXIT_BAD_INPUT") echo "bad input: an option, a data file or a setting (see above)" ;;
    "$EXIT_DIVERGED") echo "diverged: a non-finite loss stopped the training" ;;
    "$EXIT_PEER_FAILED") echo "a process hung or died and the restarts ran out (see above)" ;;
    "$EXIT_WRITE_FAILED") echo "a file could not be written (a full disk?): free space, then RUN_NAME=${RUN_NAME:-?} resumes it" ;;
    "$EXIT_PREEMPTED") echo "stopped with its state saved: RUN_NAME=${RUN_NAME:-?} resumes it" ;;
    "$EXIT_STOPPED_UNSAVED") echo "stopped by a signal before it saved anything" ;;
    *) echo "failed: see the messages above" ;;
    esac
}

below_128() { # CODE: the code itself if it is a plain exit code, else the failure code
    if (($1 >= 128 || $1 < 0)); then
        log "the training ended by a signal ($(kill -l $((${1#-} % 128)) 2>/dev/null ||
            echo "?")): exit code $EXIT_FAILED" >&2
        echo "$EXIT_FAILED"
    else
        echo "$1"
    fi
}

# --------------------------------------------------------------------------------------------
# A start: its first lines, the training, its end
# --------------------------------------------------------------------------------------------
start_log() { # LAYOUT...: the start's first lines
    log "==== start $((RESTARTS + 1)) (warning requeues $TIME_REQUEUES of at most" \
        "$MAX_REQUEUES; other requeues $((RESTARTS - TIME_REQUEUES > 0 ? RESTARTS - TIME_REQUEUES : 0))," \
        "starts without progress before it $IDLE_STARTS; SLURM_RESTART_COUNT=$RESTARTS) ===="
    log "$*"
    log "time limit ${TIME_LIMIT:-unknown}; warning (SIGUSR1) ${WARNING_S:-?} s before it"
    log "run folder: $RUN_DIR ($([[ -f $RUN_DIR/resume.pt ]] && echo 'has saved state: resuming' ||
        echo 'new run'))"
    log "python: $PYTHON; launch settings: ${LAUNCH_CONFIG:-none (one process)}"
}

run_and_wait() { # CMD...: the training (or srun) in the background, waited for
    START_STATE=$(run_files_state)
    if [[ -n $STOP ]]; then
        log "the stop signal came during the set-up: the training is not started"
        CHILD_RC=$EXIT_STOPPED_UNSAVED
        return
    fi
    "$@" &
    CHILD=$!
    forward_stop # a signal that came between the start and the line above
    wait_for_child
    if [[ -n $FORWARDER ]]; then kill "$FORWARDER" 2>/dev/null; fi
}

end_job() { # requeue or not, then exit with a code that says what happened
    local resume_then summary_then resume_now summary_now status_now ending_now stopped_by _
    read -r resume_then summary_then _ <<<"$START_STATE"
    read -r resume_now summary_now status_now ending_now stopped_by <<<"$(run_files_state)"
    # What this start did, and nothing older: an earlier start's summary.json must not decide.
    local new_status="" saved=""
    [[ $summary_now != - && $summary_now != "$summary_then" ]] && new_status=$status_now
    [[ $resume_now != - && $resume_now != "$resume_then" ]] && saved=1
    log "training exited with code $CHILD_RC; this start saved $([[ -n $saved ]] &&
        echo "new state" || echo "no new state"); run status: ${new_status:-none written by this start}"
    # What was asked: this shell's own signal, else the one the training was stopped by (a
    # `scancel --signal=USR1` without --batch reaches the training and not this shell).
    local asked=$STOP
    if [[ -z $asked && $new_status == preempted ]]; then
        asked=$([[ $stopped_by == SIGUSR1 ]] && echo USR1 || echo TERM)
    fi

    local code worker
    if [[ -n $new_status && -n $(status_exit_code "$new_status") ]]; then
        code=$(status_exit_code "$new_status")
    elif [[ -z $asked && $CHILD_RC == 0 ]]; then
        if [[ $status_now =~ ^(completed|early-stopped|diverged)$ ]]; then
            code=$(status_exit_code "$status_now") # the run had ended before: "already ended"
        else # a step-wide signal stopped it before it trained (its shells exit 0 after a stop)
            code=$EXIT_STOPPED_UNSAVED
        fi
    elif [[ -n $asked && -z $saved ]]; then
        code=$EXIT_STOPPED_UNSAVED # whatever the workers said (75 from a start-up stop)
    elif worker=$(worker_exit_code) && [[ -n $worker ]]; then
        code=$(below_128 "$worker") # torchrun's -N: killed by signal N
    elif [[ -n $asked ]]; then
        code=$EXIT_PREEMPTED
    else
        code=$(below_128 "$CHILD_RC")
    fi

    if [[ -n $saved || $new_status =~ ^(completed|early-stopped|diverged)$ ]]; then
        IDLE_STARTS=0
    else
        IDLE_STARTS=$((IDLE_STARTS + 1))
    fi
    local unfinished="" # the run goes on: it was stopped, or stopped during its end
    [[ $status_now == preempted || $ending_now == pending || $status_now == - ]] && unfinished=1
    if [[ $asked == USR1 ]]; then
        if [[ -z $unfinished ]]; then
            log "not requeued: the run has ended ($status_now)"
        elif ((IDLE_STARTS >= MAX_STARTS_WITHOUT_PROGRESS)); then
            log "not requeued: $IDLE_STARTS starts in a row saved no new state" \
                "(MAX_STARTS_WITHOUT_PROGRESS=$MAX_STARTS_WITHOUT_PROGRESS: warned before it" \
                "could save, or the save failed: see above), and a job that cannot progress" \
                "must not loop; resubmit with RUN_NAME=$RUN_NAME once the cause is fixed"
        elif ((TIME_REQUEUES >= MAX_REQUEUES)); then
            log "not requeued: the requeue limit is reached ($TIME_REQUEUES warning" \
                "requeues, MAX_REQUEUES=$MAX_REQUEUES); resubmit with RUN_NAME=$RUN_NAME (and a" \
                "longer --time, or a larger MAX_REQUEUES) to go on"
        else
            TIME_REQUEUES=$((TIME_REQUEUES + 1))
            write_chain
            log "requeueing $JOB_REF (warning requeue $TIME_REQUEUES of at most" \
                "$MAX_REQUEUES$( ((IDLE_STARTS > 0)) && echo "; this start saved nothing:" \
                "$IDLE_STARTS of at most $MAX_STARTS_WITHOUT_PROGRESS in a row")):" \
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
    # A process hung or died and torchrun's restarts ran out (exit 4: a node or the network
    # between nodes failed, or a process was killed): requeued, since the next start may get
    # other nodes or a healed network. Not counted against MAX_REQUEUES: a chain of such
    # starts ends when one saves nothing new (MAX_STARTS_WITHOUT_PROGRESS), and every start
    # that saved brings the run closer to its end.
    if [[ -z $asked && $code == "$EXIT_PEER_FAILED" && -n $unfinished ]]; then
        if ((IDLE_STARTS >= MAX_STARTS_WITHOUT_PROGRESS)); then
            log "not requeued after the failure: $IDLE_STARTS starts in a row saved no new" \
                "state (MAX_STARTS_WITHOUT_PROGRESS=$MAX_STARTS_WITHOUT_PROGRESS); resubmit" \
                "with RUN_NAME=$RUN_NAME once the nodes and the network between them are sound"
        else
            write_chain
            log "requeueing $JOB_REF after a failure between processes (exit code" \
                "$EXIT_PEER_FAILED: a node, the network between nodes or a process failed;" \
                "$([[ -n $saved ]] && echo "this start saved new state" ||
                    echo "this start saved nothing: $IDLE_STARTS of at most" \
                        "$MAX_STARTS_WITHOUT_PROGRESS in a row")): the next start resumes $RUN_DIR"
            STOP=requeued
            if scontrol requeue "$JOB_REF"; then
                exit "$EXIT_PEER_FAILED"
            fi
            log "scontrol requeue failed: resubmit with RUN_NAME=$RUN_NAME to resume"
        fi
    fi
    write_chain # SLURM may requeue the job itself (a preemption): the next start reads it
    log "job exit code $code: $(exit_meaning "$code")"
    exit "$code"
}

# --------------------------------------------------------------------------------------------
# The training: one srun step, a shell per machine (node_main), on one node or several
# --------------------------------------------------------------------------------------------
one_node_job() { # TRAINING_OPTIONS...: train_1node.sbatch
    job_setup 0
    train_on_nodes "$@"
}

multi_node_job() { # TRAINING_OPTIONS...: train_multinode.sbatch
    job_setup 3
    train_on_nodes "$@"
}

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
    # submitted again, resumes its own run. The run records its sweep (`runs --sweep`).
    RUN_NAME=$sweep-$SLURM_ARRAY_TASK_ID${name:+-$name}
    export FMNIST_SWEEP=$sweep
    log "sweep $sweep: task $SLURM_ARRAY_TASK_ID of $count lines in $grid: ${line_options[*]}"
    # The line comes last: its options win over the common ones.
    train_on_nodes "$@" "${line_options[@]}"
}

head_address() { # this node's address for the others: SLURM's NodeAddr for it, resolved here
    # SLURMD_NODENAME: the node's NodeName, which need not be its host name.
    local node=${SLURMD_NODENAME:-$(hostname -s)} addr
    addr=$(scontrol show node "$node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' |
        head -n 1)
    if [[ -n $addr && ! $addr =~ ^[0-9.]+$ ]]; then # a name: its address, not a loopback one
        addr=$(getent ahostsv4 "$addr" 2>/dev/null | awk '$1 !~ /^127\./ { print $1; exit }')
    fi
    [[ -n $addr ]] || addr=$(hostname -I 2>/dev/null | awk '{ print $1 }')
    echo "${addr:-$node}"
}

# node_main runs on every machine (one srun task each), in a new bash that gets this
# function's text (node_script): the batch shell's environment (srun --export=ALL) carries
# the FMNIST_* values. It sources SETUP_FILE (several nodes), starts the machine's launcher,
# or the one training process, and passes stop requests on to the training processes themselves:
#   - SIGUSR2: the batch shell's request (the warning, or a signal sent to the batch shell).
#     SLURM passes a signal sent to srun to every process of the step; only this shell acts
#     on it (the launcher and its processes are started with SIGUSR2 ignored). It becomes one
#     SIGTERM to each training process;
#   - SIGTERM, SIGUSR1, SIGINT, SIGHUP: a signal to the whole step (`scancel [--signal=..]`
#     without --batch, preemption, the time limit). The training processes got it too; this
#     shell sends each the same signal once more, which they count as the same request, so
#     that it reaches them also where SLURM signals these shells alone.
# The launcher (torchrun) is started with those signals ignored: its processes get them
# directly, each once, and torchrun neither stops them itself (it would kill them 30 s later)
# nor fails on a second copy (a 50-line logging traceback). After a stop this shell exits 0:
# each launcher then exits 1, and srun's --kill-on-bad-exit would kill the other machines
# while the main process writes summary.json.
node_main() {
    local rank=$SLURM_PROCID host=${SLURMD_NODENAME:-$(hostname -s)} launcher="" local_addr=""
    node_log() { echo "machine $rank ($host): $*"; }
    if [[ -n ${FMNIST_NODE_SETUP:-} ]]; then
        # shellcheck disable=SC1090  # the user's file
        source "$FMNIST_NODE_SETUP" || {
            node_log "error: SETUP_FILE=$FMNIST_NODE_SETUP failed"
            exit 2
        }
    fi
    if ((FMNIST_PROCESSES_TOTAL > 1)); then
        launcher=1
        local rendezvous=()
        if ((FMNIST_MACHINES > 1)); then
            # The rendezvous store runs on machine 0, the batch shell's node, whose address the
            # others are given; each is told whether it hosts it (torch's own guess compares
            # host names, and misses secondary addresses).
            rendezvous=(--rdzv_backend c10d --rdzv_conf "is_host=$( ((rank == 0)) && echo 1 || echo 0)")
            # The machine that the rendezvous makes the first hosts the processes' own store,
            # and gives the others its address: torchrun's --local_addr, else its host name's
            # FQDN, which the other nodes may resolve to a loopback address (Debian's
            # 127.0.1.1) or not at all, and their processes then wait for the collective
            # timeout. Each launcher is given its own address toward the head instead: the
            # source address of its route there (PET_LOCAL_ADDR is --local_addr).
            local_addr=$("$FMNIST_PYTHON" -c 'import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 9))
print(s.getsockname()[0])' "$FMNIST_HEAD_ADDR" 2>/dev/null) && export PET_LOCAL_ADDR=$local_addr
        fi
        # shellcheck disable=SC2086  # LAUNCH_ARGS is a list of options
        set -- "$FMNIST_PYTHON" -m accelerate.commands.launch --quiet --config_file "$FMNIST_CONFIG" \
            --multi_gpu --num_machines "$FMNIST_MACHINES" --machine_rank "$rank" \
            --num_processes "$FMNIST_PROCESSES_TOTAL" --main_process_ip "$FMNIST_HEAD_ADDR" \
            --main_process_port "$FMNIST_PORT" "${rendezvous[@]}" \
            --max_restarts "$FMNIST_MAX_RESTARTS" $FMNIST_LAUNCH_ARGS "$@"
    else
        set -- "$FMNIST_PYTHON" "$@" # one process in all: no launcher (see train_on_nodes)
    fi
    node_log "${PET_LOCAL_ADDR:+PET_LOCAL_ADDR=$PET_LOCAL_ADDR }$*"
    # A request that comes while a training process starts, before it has its handlers (it
    # starts with the signals ignored), is kept in this file, which it reads when it installs
    # them (fmnist_accel/cluster/stop_signals.py).
    export FMNIST_ACCEL_STOP_FILE=${TMPDIR:-/tmp}/fmnist-accel-stop-$SLURM_JOB_ID.${SLURM_STEP_ID:-0}.$rank
    rm -f "$FMNIST_ACCEL_STOP_FILE"
    trap 'rm -f "$FMNIST_ACCEL_STOP_FILE"' EXIT
    STOP="" CHILD=""
    # shellcheck disable=SC2329  # called by the traps below
    node_stop() {
        SIGNALLED=1
        [[ -n $STOP ]] && return
        STOP=$1
        local sig=$1
        if [[ $1 == USR2 ]]; then
            sig=TERM
            node_log "stop requested by the batch script: SIGTERM to the training"
        else
            node_log "SIG$1 (scancel, preemption or time limit): SIG$1 to the training"
        fi
        echo "SIG$sig" >"$FMNIST_ACCEL_STOP_FILE"
        [[ -n $CHILD ]] || return 0 # before the training starts: the file is enough
        # Once to each process of the training (whatever wraps it: a PYTHON that is a script,
        # a container): the descendants of this shell's child that run fmnist_accel. The
        # launcher is one of them, and ignores it.
        local pids=("$CHILD") pid
        while ((${#pids[@]})); do
            pid=${pids[0]}
            pids=("${pids[@]:1}")
            if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q fmnist_accel; then
                kill -"$sig" "$pid" 2>/dev/null
            fi
            # shellcheck disable=SC2207  # pids are words
            pids+=($(pgrep -P "$pid"))
        done
    }
    local signal_name
    for signal_name in TERM USR1 INT HUP USR2; do
        # shellcheck disable=SC2064  # the name now
        trap "node_stop $signal_name" "$signal_name"
    done
    # A request that came before these traps (while bash started, or SETUP_FILE ran: see
    # node_script) is acted on now.
    if [[ -n ${NODE_PENDING:-} ]]; then node_stop "$NODE_PENDING"; fi
    (
        trap '' USR2
        if [[ -n $launcher ]]; then
            # ... and torchrun, which would set handlers of its own for these, handles only
            # SIGQUIT (torch >= 2.8 reads this list).
            trap '' TERM USR1 INT HUP
            export PET_SIGNALS_TO_HANDLE=SIGQUIT
        fi
        exec "$@"
    ) &
    CHILD=$!
    wait_for_child
    [[ -n $STOP ]] && exit 0
    exit "$CHILD_RC"
}

node_script() { # what each srun task's bash runs: node_main, with stop requests kept from its start
    # SIGUSR2's default action would end the shell, and the step with it, if the request came
    # before node_main's traps: it is kept until node_main can act on it.
    echo 'NODE_PENDING=""'
    echo 'for s in TERM USR1 INT HUP USR2; do trap "NODE_PENDING=\${NODE_PENDING:-$s}" "$s"; done'
    declare -f node_main wait_for_child
    echo 'node_main "$@"'
}

train_on_nodes() { # TRAINING_OPTIONS...: the training as one srun step, then end_job
    check_run_options "$@"
    check_time_limit
    RUN_DIR=$OUTPUT_DIR/$RUN_NAME
    local nproc nodes per_node machines
    nproc=$(processes_per_node)
    nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    # MACHINES_PER_NODE > 1 starts several launchers per node: the tests' way to run the
    # several-machine path (rendezvous, ranks, stop requests) on fewer nodes.
    per_node=${MACHINES_PER_NODE:-1}
    whole_number MACHINES_PER_NODE "$per_node"
    ((per_node >= 1)) || refuse "MACHINES_PER_NODE=0: expected 1 or more"
    machines=$((nodes * per_node))
    # What node_main reads (srun passes the environment on).
    export FMNIST_MACHINES=$machines
    export FMNIST_PROCESSES_TOTAL=$((nproc * machines))
    export FMNIST_HEAD_ADDR=${MAIN_PROCESS_IP:-$(head_address)}
    export FMNIST_PORT=$PORT
    export FMNIST_MAX_RESTARTS=$MAX_RESTARTS
    export FMNIST_LAUNCH_ARGS=$LAUNCH_ARGS
    export FMNIST_PYTHON=$PYTHON
    # The repository's launch settings, never a user's default accelerate config.
    LAUNCH_CONFIG=""
    if ((FMNIST_PROCESSES_TOTAL > 1)); then
        LAUNCH_CONFIG=$(cd "$FMNIST_SLURM_DIR/../launch_configs" 2>/dev/null && pwd)/slurm_$(
            use_cpu && echo cpu || echo gpu).yaml
        [[ -f $LAUNCH_CONFIG ]] || refuse "no $LAUNCH_CONFIG: the slurm/ folder must sit in" \
            "the repository, beside launch_configs/ (or set FMNIST_SLURM_DIR)"
    fi
    export FMNIST_CONFIG=$LAUNCH_CONFIG
    # The batch shell has sourced SETUP_FILE already; the other nodes' shells source it too.
    export FMNIST_NODE_SETUP=""
    ((nodes > 1 || per_node > 1)) && FMNIST_NODE_SETUP=${SETUP_FILE:-}
    # torch 2.14 hands a restarted group the launcher's old rendezvous store, where restarted
    # gloo ranks find their dead peers' addresses (connectFullMesh refused): a fresh store per
    # restart avoids it (docs/faults.md).
    if ((MAX_RESTARTS > 0 && machines > 1)); then export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; fi
    # Every machine runs as many processes: each launcher computes its processes' ranks rather
    # than exchanging them through the rendezvous store, where a launcher cut off from the
    # network waited for minutes (docs/faults.md, "Several hosts").
    ((machines > 1)) && export TORCH_ELASTIC_WORKER_IDENTICAL=1
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
        "$machines; head: ${SLURMD_NODENAME:-$(hostname -s)} (rendezvous $FMNIST_HEAD_ADDR:$PORT);" \
        "processes: $nproc per machine, $FMNIST_PROCESSES_TOTAL in all, on" \
        "$(use_cpu && echo CPU || echo GPU) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset});" \
        "torchrun restarts a failed group up to $MAX_RESTARTS times"
    ((FMNIST_PROCESSES_TOTAL > 1)) && port_note
    log "command: ${srun[*]} bash -c node_main ${train[*]}"
    run_and_wait "${srun[@]}" bash -c "$(node_script)" node "${train[@]}"
    end_job
}
