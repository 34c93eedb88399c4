#!/usr/bin/env bash
# A real one-node Slurm on this machine, for trying `run_experiments.py --executor slurm` without a cluster
# (tests/test_slurm_real.py uses it). Idempotent: each step checks first and does only what is missing, and
# every action is printed. Needs root (the daemons run as root; munged as the munge user).
#
#   scripts/slurm_local_cluster.sh            install if missing, configure, start, wait until the node is idle
#   scripts/slurm_local_cluster.sh --check    exit 0 if the cluster answers with the node usable, 1 if not
#   scripts/slurm_local_cluster.sh --stop     stop the daemons this script starts (by their pid files)
#   --install-only                            install the packages when missing (as below), start nothing
#   --no-install                              never apt-get install; exit 3 when the packages are missing
#
# The cluster: Debian's slurm-wlm packages (slurmctld, slurmd, slurm-client) and munge; munged, slurmctld and
# slurmd on this host; /etc/slurm/slurm.conf written by this script (a file without its marker line is never
# touched: exit 5) with ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroups needed, so it
# runs in a container), SelectType=select/cons_tres, one node with this machine's CPUs and memory (from
# `slurmd -C`), one default partition `debug`, and no accounting (no slurmdbd: `sacct` does not work, see
# docs/runner.md for how kdlab knows job states without it).
#
# Exit codes: 0 the cluster is up; 1 --check: it is not; 3 the packages are missing and cannot be installed;
# 4 not root; 5 an /etc/slurm/slurm.conf not written by this script exists; 6 the daemons did not come up
# (the log tail is printed). Every non-zero exit prints one `slurm_local_cluster: <reason>` line on stderr.
set -uo pipefail

MARKER="# written by kdlab scripts/slurm_local_cluster.sh"
CONF=/etc/slurm/slurm.conf
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
LOGDIR=/var/log/slurm
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
PACKAGES=(slurmctld slurmd slurm-client munge)

mode=start
install=1
for arg in "$@"; do
    case "$arg" in
        --check) mode=check ;;
        --stop) mode=stop ;;
        --no-install) install=0 ;;
        --install-only) mode=install ;;
        -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "slurm_local_cluster: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "slurm_local_cluster: $*"; }
fail() { # fail CODE REASON
    echo "slurm_local_cluster: $2" >&2
    exit "$1"
}

node_name() { hostname -s; }
node_state() { sinfo -h -N -n "$(node_name)" -o %T 2>/dev/null | head -n1; }
usable() { # the controller answers and the node takes jobs
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
    && command -v munged >/dev/null; }

if [ "$mode" = check ]; then
    if installed && usable; then say "up: node $(node_name) $(node_state)"; exit 0; fi
    echo "slurm_local_cluster: not up" >&2
    exit 1
fi

if [ "$mode" = stop ]; then
    [ "$(id -u)" = 0 ] || fail 4 "--stop needs root"
    for pidfile in "$SLURMD_PID" "$CTLD_PID" "$MUNGE_PID"; do
        if alive "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid" && say "stopped pid $pid ($pidfile)"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    exit 0
fi

if [ "$mode" = install ] && installed; then
    say "slurm and munge are installed"
    exit 0
fi
if [ "$mode" = start ] && installed && usable; then
    say "already up: node $(node_name) $(node_state); nothing to do"
    exit 0
fi

[ "$(id -u)" = 0 ] || fail 4 "not root: the Slurm daemons must be started by root (run this script with sudo)"

# 1. the packages
if ! installed; then
    if [ "$install" = 0 ]; then
        fail 3 "Slurm or munge is not installed (${PACKAGES[*]}) and --no-install was given"
    fi
    command -v apt-get >/dev/null || fail 3 "Slurm or munge is not installed and there is no apt-get here to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt=(apt-get -q -o Acquire::Retries=0 -o Acquire::http::Timeout=20 -o Acquire::https::Timeout=20)
    aptlog=/tmp/slurm_local_cluster.apt.log
    if ! "${apt[@]}" install -y --no-install-recommends "${PACKAGES[@]}" >"$aptlog" 2>&1; then
        # the package lists may be missing or stale on a fresh machine
        "${apt[@]}" update >>"$aptlog" 2>&1
        "${apt[@]}" install -y --no-install-recommends "${PACKAGES[@]}" >>"$aptlog" 2>&1 \
            || fail 3 "apt-get install ${PACKAGES[*]} failed: $(grep -E '^(E|W):' "$aptlog" | tail -n 1)"
    fi
    installed || fail 3 "apt-get installed ${PACKAGES[*]} but slurmctld/slurmd/sinfo/munged are still missing"
    say "installed ${PACKAGES[*]}"
fi
[ "$mode" = install ] && exit 0

# 2. munge: a key, then the daemon (munged runs as the munge user when there is one)
if ! (munge -n 2>/dev/null | unmunge >/dev/null 2>&1); then
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key >/dev/null
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
        say "created /etc/munge/munge.key"
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    if id munge >/dev/null 2>&1; then
        chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
        chmod 0700 /etc/munge
        chmod 0400 /etc/munge/munge.key
        runuser -u munge -- munged || fail 6 "munged did not start"
    else
        chmod 0400 /etc/munge/munge.key
        munged --force || fail 6 "munged did not start"
    fi
    for _ in $(seq 50); do (munge -n | unmunge >/dev/null 2>&1) && break; sleep 0.1; done
    (munge -n | unmunge >/dev/null 2>&1) || fail 6 "munged started but munge -n | unmunge fails"
    say "started munged (pid $(cat "$MUNGE_PID" 2>/dev/null || echo ?))"
else
    say "munged already running"
fi

# 3. slurm.conf for this machine
node=$(node_name)
hw=$(slurmd -C | head -n1) # NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=..
memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
layout=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//' <<<"$hw")
memory=$((memory * 9 / 10)) # configured above the real memory, the node would be drained
wanted=$(cat <<EOF
$MARKER; regenerated when this machine's hostname, CPUs or memory change.
ClusterName=kdlab
SlurmctldHost=$node(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 $layout RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
restart=0
if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    fail 5 "$CONF exists and was not written by this script; not touching it (move it away to use this script)"
fi
if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$wanted" ]; then
    mkdir -p /etc/slurm
    printf '%s\n' "$wanted" >"$CONF"
    say "wrote $CONF (node $node: $layout RealMemory=$memory)"
    restart=1
else
    say "$CONF is up to date"
fi
mkdir -p /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$LOGDIR"

# 4. the daemons
if [ "$restart" = 1 ]; then
    for pidfile in "$SLURMD_PID" "$CTLD_PID"; do
        if alive "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid" && say "stopped pid $pid ($pidfile) for the new slurm.conf"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi
if alive "$CTLD_PID"; then
    say "slurmctld already running (pid $(cat "$CTLD_PID"))"
else
    slurmctld || fail 6 "slurmctld did not start: $(tail -n 3 "$LOGDIR/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
    for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
    say "started slurmctld (pid $(cat "$CTLD_PID" 2>/dev/null || echo ?))"
fi
if alive "$SLURMD_PID"; then
    say "slurmd already running (pid $(cat "$SLURMD_PID"))"
else
    slurmd || fail 6 "slurmd did not start: $(tail -n 3 "$LOGDIR/slurmd.log" 2>/dev/null | tr '\n' ' ')"
    for _ in $(seq 50); do [ -s "$SLURMD_PID" ] && break; sleep 0.1; done
    say "started slurmd (pid $(cat "$SLURMD_PID" 2>/dev/null || echo ?))"
fi

# 5. wait until the node takes jobs (a drained node from an earlier run is resumed)
for _ in $(seq $((WAIT_S * 2))); do
    state=$(node_state)
    case "$state" in
        drain* | drng* | draining | drained)
            scontrol update nodename="$node" state=resume 2>/dev/null && say "resumed the drained node $node" ;;
    esac
    if usable; then
        say "up: node $node $(node_state) ($(sinfo -h -o '%P %D nodes %c CPUs' | head -n1))"
        exit 0
    fi
    sleep 0.5
done
fail 6 "node $node is '$(node_state)' after ${WAIT_S} s, not idle; slurmctld.log: $(tail -n 3 "$LOGDIR/slurmctld.log" 2>/dev/null | tr '\n' ' ') slurmd.log: $(tail -n 3 "$LOGDIR/slurmd.log" 2>/dev/null | tr '\n' ' ')"
