#!/usr/bin/env bash
# Test profiles/slurm/ against a REAL single-node SLURM cluster brought up on this machine.
#
#   scripts/slurm-selftest.sh            full test: bring SLURM up; run the pipeline on the tiny config
#                                        through SLURM (profiles/slurm, CPU-only: every rule a SLURM
#                                        job) and, for reference, its eval cells locally (profiles/local);
#                                        check that every eval cell ran as its own SLURM job and that both
#                                        runs give bit-identical NLL arrays; print the jobs (id, rule,
#                                        state, wall time); stop SLURM.
#   scripts/slurm-selftest.sh --smoke    the small workflow scripts/slurm/smoke.smk instead of the
#                                        pipeline, with the profile's default GPU request (one of the
#                                        node's fake GPUs per eval cell); about 1.5 minutes.
#   scripts/slurm-selftest.sh --up       only bring the cluster up and leave it running (for trying
#                                        things by hand: sinfo, sbatch, snakemake --profile profiles/slurm)
#   scripts/slurm-selftest.sh --down     stop daemons left running by --up (by their pid files)
#
# Needs root (it installs Debian packages and starts munged/slurmctld/slurmd) and the project's
# .venv (scripts/setup.sh). Idempotent: packages are installed only when missing.
# No slurmdbd/MariaDB: the Snakemake plugin is told to poll job states with squeue
# (--slurm-status-command squeue) and slurmctld keeps finished jobs for an hour (MinJobAge=3600).
#
# Environment (all optional):
#   KVSTREAM_SLURM_RUNDIR      run directory (default /tmp/kvstream-slurm-selftest; emptied first):
#                              slurm.conf copy, daemon logs and state, the two pipeline work dirs
#   KVSTREAM_SLURM_CONFIGFILE  pipeline config for the test (default config/tiny.yaml)
#   KVSTREAM_SLURM_JOBS        concurrent SLURM jobs / local cores (default 2)
#   KVSTREAM_SLURM_TIMEOUT     seconds allowed for each Snakemake run (default 1800)
#   KVSTREAM_SLURM_UNTIL       limit the SLURM run to this rule and its inputs (e.g. eval; default:
#                              the whole DAG, paper included)
#   KVSTREAM_SLURM_PORTS       "ctld,slurmd" TCP ports (default 6817,6818)
#   KVSTREAM_SLURM_FAKE_GPUS   fake GPUs the node advertises (GRES gpu, 1 to 5; default 2)
#   KVSTREAM_SLURM_ARGS        extra Snakemake arguments for the SLURM run, split at spaces
#                              (e.g. "--slurm-array-jobs eval")
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$REPO/scripts/slurm
RUN=${KVSTREAM_SLURM_RUNDIR:-/tmp/kvstream-slurm-selftest}
CONFIGFILE=${KVSTREAM_SLURM_CONFIGFILE:-config/tiny.yaml}
NJOBS=${KVSTREAM_SLURM_JOBS:-2}
SM_TIMEOUT=${KVSTREAM_SLURM_TIMEOUT:-1800}
UNTIL=${KVSTREAM_SLURM_UNTIL:-}
PORTS=${KVSTREAM_SLURM_PORTS:-6817,6818}
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
FAKE_GPUS=${KVSTREAM_SLURM_FAKE_GPUS:-2}
MARKER="# kvstream-selftest"
PARTITION=debug
SNAKEMAKE=$REPO/.venv/bin/snakemake
PYTHON=$REPO/.venv/bin/python

MODE=full
case "${1:-}" in
    "") ;;
    --smoke) MODE=smoke ;;
    --up) MODE=up ;;
    --down) MODE=down ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--smoke|--up|--down]" >&2; exit 2 ;;
esac

T0=$(date +%s)
log() { printf '[slurm-selftest %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# daemons: start/stop (only processes this script started, recorded in $RUN/*.pid)
# ---------------------------------------------------------------------------------------------
stop_daemons() {
    local pidfile pid name
    if [ -f "$RUN/slurmctld.pid.ours" ] && command -v scancel >/dev/null; then
        timeout 10 scancel --quiet --user "$(id -un)" 2>/dev/null || true
    fi
    for name in slurmd slurmctld munged; do
        pidfile=$RUN/$name.pid.ours
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            if kill -0 "$pid" 2>/dev/null; then
                log "$name (pid $pid) did not stop in 10 s, sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
        rm -f "$pidfile"
    done
    # slurmstepd processes of jobs killed above leave on their own once slurmd is gone
    local f
    for f in "$CONF" "$GRES_CONF"; do
        if [ -f "$RUN/$(basename "$f").backup" ]; then
            mv -f "$RUN/$(basename "$f").backup" "$f"
            log "restored the previous $f"
        elif [ -f "$f" ] && head -1 "$f" | grep -q "^$MARKER"; then
            rm -f "$f"
        fi
    done
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "${SM_PID:-}" ] && kill -0 "$SM_PID" 2>/dev/null; then
        # SIGINT (forwarded by `timeout`) makes Snakemake scancel its SLURM jobs and exit;
        # SIGTERM would let it wait for the running jobs. Daemons stay up until it is gone.
        log "interrupting Snakemake (pid $SM_PID), which cancels its SLURM jobs"
        local child
        child=$(pgrep -P "$SM_PID" 2>/dev/null | head -1 || true)
        kill -INT "$SM_PID" 2>/dev/null || true
        for _ in $(seq 150); do kill -0 "$SM_PID" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$SM_PID" 2>/dev/null; then
            log "Snakemake still running after 30 s: SIGKILL"
            kill -KILL "$SM_PID" ${child:+"$child"} 2>/dev/null || true
        fi
    fi
    if [ "$MODE" != up ] || [ $rc -ne 0 ]; then
        stop_daemons
    fi
    if [ $rc -ne 0 ]; then
        log "FAILED (exit $rc) after $(( $(date +%s) - T0 )) s; logs are in $RUN/log"
        for f in "$RUN"/log/slurmctld.log "$RUN"/log/slurmd.log; do
            [ -s "$f" ] && { echo "---- last lines of $f" >&2; tail -n 15 "$f" >&2; }
        done
    fi
    exit $rc
}

if [ "$MODE" = down ]; then
    stop_daemons
    log "done"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 1. prerequisites and packages
# ---------------------------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "must run as root (installs Debian packages and starts munged, slurmctld, slurmd)"
# one selftest per machine at a time: /etc/slurm/slurm.conf and the ports are machine-wide
exec 9> /tmp/kvstream-slurm-selftest.lock
flock -n 9 || die "another scripts/slurm-selftest.sh is running on this machine, or a cluster it left up with --up (stop that with --down); lock: /tmp/kvstream-slurm-selftest.lock"
[ -x "$SNAKEMAKE" ] || die "$SNAKEMAKE not found: run scripts/setup.sh (or make setup) first"
"$PYTHON" -c "import snakemake_executor_plugin_slurm" 2>/dev/null \
    || die "snakemake-executor-plugin-slurm is not installed in .venv (it is in requirements.lock: rerun scripts/setup.sh)"

need=()
for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing Debian packages: ${need[*]}"
    # keep the packages' init scripts from starting daemons with their default configuration
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
    fi
    { timeout 600 apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends \
            "${need[@]}"; } > "/tmp/kvstream-slurm-apt.log" 2>&1 \
        || { [ $own_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d; tail -20 /tmp/kvstream-slurm-apt.log >&2;
             die "apt-get install ${need[*]} failed (log: /tmp/kvstream-slurm-apt.log)"; }
    [ $own_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d
fi
log "packages: $(dpkg-query -W -f '${Package} ${Version}  ' slurmctld slurmd slurm-client munge 2>/dev/null)"

# ---------------------------------------------------------------------------------------------
# 2. configuration
# ---------------------------------------------------------------------------------------------
CTLD_PORT=${PORTS%,*}
SLURMD_PORT=${PORTS#*,}
if [ -f "$RUN/slurmctld.pid.ours" ] && kill -0 "$(cat "$RUN/slurmctld.pid.ours")" 2>/dev/null; then
    die "a selftest cluster from an earlier --up is still running; stop it first: $0 --down"
fi
if timeout 5 scontrol ping >/dev/null 2>&1; then
    die "a SLURM controller is already answering on this machine ($(scontrol ping 2>&1 | head -1)); this selftest brings up its own cluster - run it on a machine without SLURM"
fi
if command -v ss >/dev/null && ss -ltn | awk '{print $4}' | grep -Eq ":($CTLD_PORT|$SLURMD_PORT)\$"; then
    die "TCP port $CTLD_PORT or $SLURMD_PORT is in use; choose others with KVSTREAM_SLURM_PORTS=ctld,slurmd"
fi

case "$RUN" in /|/tmp|/tmp/|/root|/work*) die "refusing KVSTREAM_SLURM_RUNDIR=$RUN" ;; esac
rm -rf "$RUN"
mkdir -p "$RUN"/{state,spool,log}
trap on_exit EXIT
trap 'log "ERROR: line $LINENO: \"$BASH_COMMAND\" failed"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

HOST=$(hostname -s)
ADDR=127.0.0.1
hw=$(slurmd -C | head -1) || die "slurmd -C failed"   # NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105
NODE_HW=$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
MEM=$(tr ' ' '\n' <<<"$hw" | sed -n 's/^RealMemory=//p')
# The pipeline's rules ask up to 8 GB (prepare_model). Memory is not a consumable resource here
# (CR_Core, task/none), but sbatch rejects --mem above RealMemory: on a smaller machine, let
# slurmd accept a RealMemory larger than the physical one.
SLURMD_PARAMETERS="# SlurmdParameters: default"
if [ "${MEM:-0}" -lt 16000 ]; then
    log "this machine has ${MEM} MB; declaring RealMemory=16000 (SlurmdParameters=config_overrides)"
    MEM=16000
    SLURMD_PARAMETERS="SlurmdParameters=config_overrides"
fi

for f in "$CONF" "$GRES_CONF"; do
    if [ -f "$f" ] && ! head -1 "$f" | grep -q "^$MARKER"; then
        cp -p "$f" "$RUN/$(basename "$f").backup"
        log "moved the existing $f aside (restored on exit)"
    fi
done
mkdir -p /etc/slurm
# /etc/slurm/slurm.conf is where srun inside a job looks (the plugin's job step drops SLURM_CONF)
sed -e "s|@HOST@|$HOST|g" -e "s|@ADDR@|$ADDR|g" -e "s|@RUN@|$RUN|g" \
    -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    -e "s|@NODE_HW@|$NODE_HW|g" -e "s|@MEM@|$MEM|g" -e "s|@PARTITION@|$PARTITION|g" \
    -e "s|@SLURMD_PARAMETERS@|$SLURMD_PARAMETERS|g" -e "s|@GPUS@|$FAKE_GPUS|g" \
    "$HERE/slurm.conf.in" > "$CONF"
# Fake GPUs: slurmd counts a gpu GRES only with a device file, so each one is a harmless character
# device (with task/none nothing is bound or confined; CUDA_VISIBLE_DEVICES is set by index).
{
    echo "$MARKER: generated by scripts/slurm-selftest.sh; fake GPUs, not real devices"
    for dev in $(printf '%s\n' /dev/null /dev/zero /dev/full /dev/random /dev/urandom | head -n "$FAKE_GPUS"); do
        echo "NodeName=$HOST Name=gpu File=$dev"
    done
} > "$GRES_CONF"
cp "$CONF" "$GRES_CONF" "$RUN/"
log "wrote $CONF: node $HOST ($NODE_HW RealMemory=$MEM, $FAKE_GPUS fake GPUs), partition $PARTITION, no accounting database"

# ---------------------------------------------------------------------------------------------
# 3. daemons
# ---------------------------------------------------------------------------------------------
start_bg() {   # name, command...: run in the foreground mode of the daemon, in the background
    local name=$1; shift
    "$@" > "$RUN/log/$name.out" 2>&1 &
    echo $! > "$RUN/$name.pid.ours"
    log "started $name (pid $!)"
}

if timeout 5 sh -c 'munge -n | unmunge' >/dev/null 2>&1; then
    log "munged is already running; using it"
else
    [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    # setpriv execs munged as user munge (so $! is munged itself)
    start_bg munged setpriv --reuid munge --regid munge --init-groups /usr/sbin/munged --foreground
    for _ in $(seq 50); do sh -c 'munge -n | unmunge' >/dev/null 2>&1 && break; sleep 0.2; done
    sh -c 'munge -n | unmunge' >/dev/null 2>&1 || die "munged did not come up (see $RUN/log/munged.out)"
fi

start_bg slurmctld slurmctld -D -i -f "$CONF"
for _ in $(seq 60); do scontrol ping >/dev/null 2>&1 && break; sleep 0.5; done
scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer (see $RUN/log/slurmctld.log)"
start_bg slurmd slurmd -D -f "$CONF"

state=""
for _ in $(seq 120); do
    state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -1 || true)
    [ "$state" = idle ] && break
    sleep 0.5
done
if [ "$state" != idle ]; then
    sinfo -R >&2 || true
    die "node $HOST is '${state:-absent}', not idle, after 60 s (see $RUN/log/slurmd.log)"
fi
log "cluster up: $(sinfo -h -o '%P %a %D %T %c CPUs %m MB' | head -1)"

# a plain batch job (with a job step, as the plugin runs them) before involving Snakemake
jid=$(sbatch --parsable -o "$RUN/log/hello-%j.out" -t 1 --mem 100 --wrap 'srun -n1 hostname') \
    || die "sbatch of a test job failed"
st=""
for _ in $(seq 60); do
    st=$(squeue -h -j "$jid" --states=all -o '%T' 2>/dev/null || true)
    case "$st" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
    sleep 0.5
done
[ "$st" = COMPLETED ] || die "test batch job $jid ended as '${st:-?}' (output: $(cat "$RUN"/log/hello-*.out 2>/dev/null))"
log "test batch job $jid COMPLETED on $(cat "$RUN/log/hello-$jid.out")"

if [ "$MODE" = up ]; then
    log "cluster left running (state in $RUN). Try: sinfo; snakemake --profile profiles/slurm --slurm-status-command squeue ..."
    log "stop it with: $0 --down  (KVSTREAM_SLURM_RUNDIR=$RUN)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 4. the workflow: once locally (reference), once through SLURM
# ---------------------------------------------------------------------------------------------
# Each run gets its own copy of the repository's files (tracked and untracked, not ignored) so
# results/ and .snakemake/ of the two runs, and of the developer's checkout, stay apart.
make_workdir() {
    local dest=$1
    mkdir -p "$dest"
    if [ "$MODE" = smoke ]; then
        cp "$HERE/smoke.smk" "$dest/Snakefile"
        mkdir -p "$dest/profiles" && cp -r "$REPO/profiles/local" "$REPO/profiles/slurm" "$dest/profiles/"
    else
        (cd "$REPO" && git ls-files -z -c -o --exclude-standard | xargs -0 cp --parents -t "$dest" 2>/dev/null) \
            || (cd "$REPO" && tar --exclude=./.git --exclude=./.venv --exclude=./results --exclude=./.snakemake -cf - . ) \
               | tar -xf - -C "$dest"
        # downloads cached by the pipeline (git-ignored), if any, are shared read-mostly
        if [ -d "$REPO/resources" ] && [ ! -e "$dest/resources" ]; then
            cp -a "$REPO/resources" "$dest/resources"
        fi
    fi
}

SM_COMMON=()
LOCAL_ARGS=()
SLURM_EXTRA=()
if [ "$MODE" = full ]; then
    [ -f "$REPO/Snakefile" ] || [ -f "$REPO/workflow/Snakefile" ] || die "no Snakefile in $REPO yet"
    [ -f "$REPO/$CONFIGFILE" ] || die "config file $CONFIGFILE not found in $REPO"
    SM_COMMON+=(--configfile "$CONFIGFILE")
    # the reference needs only the cells (and what they depend on). Cells come from one rule per
    # dataset batch (eval_<dataset>_b<k>) and, for identical schedules, reuse_<dataset>_b<k>: "eval"
    # stands for all of them.
    read -r -a CELL_RULES <<<"$(cd "$REPO" && "$REPO/.venv/bin/snakemake" --configfile "$CONFIGFILE" --list-rules 2>/dev/null \
        | grep -E '^(eval|reuse)_' | tr '\n' ' ')"
    [ ${#CELL_RULES[@]} -gt 0 ] || die "no eval_* rules listed by snakemake --list-rules"
    LOCAL_ARGS+=(--until "${CELL_RULES[@]}")
    if [ "$UNTIL" = eval ]; then SLURM_EXTRA+=(--until "${CELL_RULES[@]}");
    elif [ -n "$UNTIL" ]; then SLURM_EXTRA+=(--until "$UNTIL"); fi
fi
read -r -a _extra <<<"${KVSTREAM_SLURM_ARGS:-}"
SLURM_EXTRA+=("${_extra[@]}")
export PATH="$REPO/.venv/bin:$PATH"

# Snakemake runs in the background and the script `wait`s for it, so that a signal to this script
# is handled at once: on_exit stops Snakemake (which scancels its jobs), then the daemons.
SM_PID=""
run_snakemake() {   # workdir, logfile, command...
    local wd=$1 logfile=$2 rc=0; shift 2
    (cd "$wd" && exec timeout "$SM_TIMEOUT" "$@") > "$logfile" 2>&1 &
    SM_PID=$!
    wait "$SM_PID" || rc=$?
    SM_PID=""
    [ $rc -eq 124 ] && log "Snakemake did not finish within KVSTREAM_SLURM_TIMEOUT=$SM_TIMEOUT s"
    return $rc
}

LOCAL_WD=$RUN/local
SLURM_WD=$RUN/slurm
make_workdir "$LOCAL_WD"
make_workdir "$SLURM_WD"

log "reference run: snakemake --profile profiles/local --cores $NJOBS ${SM_COMMON[*]} ${LOCAL_ARGS[*]} (in $LOCAL_WD)"
t=$(date +%s)
run_snakemake "$LOCAL_WD" "$RUN/log/snakemake-local.log" \
    "$SNAKEMAKE" --profile profiles/local --cores "$NJOBS" "${SM_COMMON[@]}" "${LOCAL_ARGS[@]}" \
    || { tail -n 40 "$RUN/log/snakemake-local.log" >&2; die "local run failed (log: $RUN/log/snakemake-local.log)"; }
LOCAL_WALL=$(( $(date +%s) - t ))
log "reference run finished in ${LOCAL_WALL} s"

SLURM_ARGS=(--profile profiles/slurm --jobs "$NJOBS" "${SM_COMMON[@]}"
            --slurm-status-command squeue --slurm-init-seconds-before-status-checks 3
            --slurm-keep-successful-logs --latency-wait 5 --retries 0 "${SLURM_EXTRA[@]}")
# The pipeline's cells run CPU-only (KVSTREAM_SLURM_GPUS=0, as on a CPU cluster); the smoke cells
# keep the profile's default request of one GPU per cell.
GPUS_ENV=0
[ "$MODE" = smoke ] && GPUS_ENV=""
log "SLURM run: KVSTREAM_SLURM_GPUS=${GPUS_ENV:-(unset: 1)} snakemake ${SLURM_ARGS[*]} (in $SLURM_WD)"
t=$(date +%s)
KVSTREAM_SLURM_GPUS=$GPUS_ENV KVSTREAM_SLURM_PARTITION=$PARTITION \
    run_snakemake "$SLURM_WD" "$RUN/log/snakemake-slurm.log" "$SNAKEMAKE" "${SLURM_ARGS[@]}" \
    || { tail -n 60 "$RUN/log/snakemake-slurm.log" >&2; die "SLURM run failed (log: $RUN/log/snakemake-slurm.log)"; }
SLURM_WALL=$(( $(date +%s) - t ))
log "SLURM run finished in ${SLURM_WALL} s"

# ---------------------------------------------------------------------------------------------
# 5. checks and report
# ---------------------------------------------------------------------------------------------
scontrol show job -o > "$RUN/log/jobs.txt" 2>/dev/null || true
"$PYTHON" "$HERE/check_run.py" --mode "$MODE" --jobs "$RUN/log/jobs.txt" \
    --local "$LOCAL_WD" --slurm "$SLURM_WD" --local-wall "$LOCAL_WALL" --slurm-wall "$SLURM_WALL" \
    --expect-gpus "${GPUS_ENV:-1}"
log "PASSED in $(( $(date +%s) - T0 )) s (SLURM run ${SLURM_WALL} s, local run ${LOCAL_WALL} s)"
