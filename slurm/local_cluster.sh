#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (for tests and for trying the sbatch scripts).
#
# What it does, in order, skipping every step that is already done (safe to run repeatedly):
#   1. installs `slurm-wlm` and `munge` with apt-get, only when `sbatch` is missing;
#   2. creates the munge key (if the package did not) and starts `munged`;
#   3. writes /etc/slurm/slurm.conf for this host (real `hostname -s`, CPUs/RealMemory as
#      `slurmd -C` reports them, one default partition `debug`), only when absent or when it was
#      written by this script (a hand-made slurm.conf is never overwritten);
#   4. starts `slurmctld` and `slurmd` as root (no systemd needed: containers, CI runners);
#   5. waits until the node is idle and prints `sinfo`.
#
# Usage:   sudo slurm/local_cluster.sh            # start (or confirm it is up)
#          slurm/local_cluster.sh --stop          # stop the daemons this script started
# Env:     SLURM_LOCAL_CPUS  CPUs to give the node (default: all, as `slurmd -C` reports)
#          SLURM_LOCAL_WAIT  seconds to wait for the node to become idle (default 60)
#
# Exit status: 0 when the cluster accepts jobs; non-zero with a message on stderr otherwise.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="${CONF_DIR}/slurm.conf"
MARKER="# written by sapiens-train slurm/local_cluster.sh"
LOG_DIR=/var/log/slurm
WAIT_S="${SLURM_LOCAL_WAIT:-60}"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }
log() { echo "local_cluster.sh: $*"; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (it installs packages and starts slurmctld/slurmd)."

stop_all() {
    # Only the daemons this script starts; identified by their pid files, never by name.
    local pidfile pid
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" && log "stopped pid $pid ($pidfile)"
        fi
    done
}

if [[ "${1:-}" == "--stop" ]]; then
    stop_all
    exit 0
fi

cluster_up() {
    # Up = the controller answers and our node is usable (idle/mixed/allocated, not down/drained).
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state="$(sinfo -h -N -n "$(hostname -s)" -o '%t' 2>/dev/null | head -n1)" || return 1
    [[ "$state" =~ ^(idle|mix|alloc|comp)$ ]]
}

if cluster_up; then
    log "cluster already up"
    sinfo
    exit 0
fi

# ---- 1. packages ---------------------------------------------------------------------------------
if ! command -v sbatch >/dev/null 2>&1 || ! command -v slurmctld >/dev/null 2>&1 \
    || ! command -v munged >/dev/null 2>&1; then
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed (no package mirror reachable?)"
    apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
fi
for exe in sbatch srun sinfo scontrol slurmctld slurmd munged; do
    command -v "$exe" >/dev/null 2>&1 || die "'$exe' not found after installing slurm-wlm/munge"
done

# ---- 2. munge ------------------------------------------------------------------------------------
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
# munged refuses keys/dirs that others can write; give them to the munge user when it exists.
MUNGE_USER=root
id munge >/dev/null 2>&1 && MUNGE_USER=munge
chown -R "$MUNGE_USER": /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged (as $MUNGE_USER)"
    if [[ "$MUNGE_USER" == root ]]; then
        munged --force
    else
        runuser -u munge -- munged
    fi
    for _ in $(seq 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# ---- 3. slurm.conf -------------------------------------------------------------------------------
HOST="$(hostname -s)"
getent hosts "$HOST" >/dev/null || die "hostname '$HOST' does not resolve; add it to /etc/hosts"
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd

if [[ ! -f "$CONF" ]] || grep -qF "$MARKER" "$CONF"; then
    # `slurmd -C` prints this machine's real layout (Boards/Sockets/Cores/Threads/RealMemory);
    # a NodeName line that claims more than the hardware has gets the node drained.
    NODE_LINE="$(slurmd -C | grep '^NodeName=' | sed -E 's/ UpTime=.*//')"
    [[ -n "$NODE_LINE" ]] || die "'slurmd -C' printed no NodeName line"
    if [[ -n "${SLURM_LOCAL_CPUS:-}" ]]; then
        NODE_LINE="$(sed -E "s/CPUs=[0-9]+/CPUs=${SLURM_LOCAL_CPUS}/" <<<"$NODE_LINE")"
    fi
    # Leave headroom so that memory reported slightly lower after a reboot does not drain the node.
    MEM="$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$NODE_LINE")"
    NODE_LINE="$(sed -E "s/RealMemory=[0-9]+/RealMemory=$((MEM * 95 / 100))/" <<<"$NODE_LINE")"
    TMP_CONF="$(mktemp "${CONF}.XXXXXX")"
    cat >"$TMP_CONF" <<EOF
$MARKER
# Single-node cluster for tests. Edit freely after removing the line above.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Requeue is how Lightning's SLURMEnvironment resumes jobs (scontrol requeue on SIGUSR1).
JobRequeue=1
# A node that went down (daemon restart, reboot) comes back by itself.
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f "$CONF" ]] && cmp -s "$TMP_CONF" "$CONF"; then
        rm -f "$TMP_CONF"
    else
        chmod 0644 "$TMP_CONF"
        mv -f "$TMP_CONF" "$CONF"
        log "wrote $CONF"
    fi
else
    log "keeping existing $CONF (not written by this script)"
fi

# ---- 4. daemons ----------------------------------------------------------------------------------
running() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! running /run/slurmctld.pid; then
    log "starting slurmctld"
    slurmctld -f "$CONF"
fi
if ! running /run/slurmd.pid; then
    log "starting slurmd"
    slurmd -f "$CONF"
fi

# ---- 5. wait for the node ------------------------------------------------------------------------
deadline=$((SECONDS + WAIT_S))
until cluster_up; do
    state="$(sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null | head -n1 || true)"
    if [[ "$state" =~ ^(down|drain|drng|fail) ]]; then
        # A node left down by an earlier run (e.g. config changed) is put back in service.
        scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    fi
    if ((SECONDS > deadline)); then
        sinfo -N -l >&2 || true
        tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
        die "node '$HOST' not idle after ${WAIT_S}s (state: '${state:-no answer}')"
    fi
    sleep 1
done
log "cluster up"
sinfo
