#!/bin/bash
# A real 2-node Slurm cluster on this machine, for tests and for trying the Slurm backend.
#
#   clusters/slurm-local.sh start [--accounting] [--gpus]   install (Debian packages) and start; idempotent
#   clusters/slurm-local.sh status                           show the nodes
#   clusters/slurm-local.sh stop                             stop every daemon it started
#
# Nodes n1 and n2 both run on localhost (two slurmd with their own ports). --accounting adds
# slurmdbd with MariaDB so that sacct works as on production clusters; --gpus gives each node
# two fake GPUs (gres.conf over character devices made with mknod) so that GPU directives such
# as --gpus-per-node are accepted. Clients need SLURM_CONF=$MOE_SLURM_DIR/slurm.conf
# (default /tmp/moe-slurm/slurm.conf), which clusters/slurm-local.yaml sets.
set -euo pipefail

STATE=${MOE_SLURM_DIR:-/tmp/moe-slurm}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF
CTLD_PORT=16817
NODES=(n1 n2)
NODE_PORTS=(16818 16819)

die() { echo "slurm-local: $*" >&2; exit 1; }

install_packages() {
    local packages=(slurmctld slurmd slurm-client munge)
    [ "$ACCOUNTING" = 1 ] && packages+=(slurmdbd mariadb-server)
    local missing=()
    for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "needs root to install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

running() {  # pidfile
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
    pgrep -x munged >/dev/null && return 0
    [ -f /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    else
        /usr/sbin/munged --force
    fi
}

start_accounting() {
    local sock=$STATE/mysql/mysqld.sock
    if ! mariadb-admin --socket="$sock" ping >/dev/null 2>&1; then
        mkdir -p "$STATE/mysql" /run/mysqld
        chown mysql:mysql "$STATE/mysql" /run/mysqld 2>/dev/null || true
        if [ ! -d "$STATE/mysql/mysql" ]; then
            mariadb-install-db --user=mysql --datadir="$STATE/mysql" >"$STATE/mysql-install.log" 2>&1 \
                || die "mariadb-install-db failed; see $STATE/mysql-install.log"
        fi
        # A server that died leaves its socket behind; clients would then get "connection refused".
        rm -f "$sock"
        (mariadbd --user=mysql --datadir="$STATE/mysql" --socket="$sock" --port=13306 \
            --pid-file="$STATE/mysql/mysqld.pid" --skip-networking=0 --bind-address=127.0.0.1 >"$STATE/mysqld.log" 2>&1 &)
        # The first start creates InnoDB's files, which takes a while on a slow disk.
        for _ in $(seq 240); do mariadb-admin --socket="$sock" ping >/dev/null 2>&1 && break; sleep 0.5; done
        if ! mariadb-admin --socket="$sock" ping >/dev/null 2>&1; then
            tail -n 20 "$STATE/mysqld.log" >&2
            die "MariaDB did not answer within 120 s; see $STATE/mysqld.log"
        fi
        mariadb --socket="$sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    fi
    cat > "$STATE/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=16820
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=13306
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/slurmdbd.log
CONF
    chmod 600 "$STATE/slurmdbd.conf"
    if ! running "$STATE/slurmdbd.pid"; then
        slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
        for _ in $(seq 240); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
        sacctmgr -n list cluster >/dev/null 2>&1 || { tail -n 20 "$STATE/slurmdbd.log" >&2; die "slurmdbd did not answer within 120 s"; }
    fi
    sacctmgr -i add cluster moelocal >/dev/null 2>&1 || true
}

write_config() {
    mkdir -p "$STATE/state"
    local gres="" node_gres=""
    if [ "$GPUS" = 1 ]; then
        mkdir -p "$STATE/dev"
        for i in 0 1; do [ -e "$STATE/dev/nvidia$i" ] || mknod "$STATE/dev/nvidia$i" c 195 "$i"; done
        gres="GresTypes=gpu"
        node_gres="Gres=gpu:2"
        echo "Name=gpu File=$STATE/dev/nvidia[0-1]" > "$STATE/gres.conf"
    fi
    local accounting="AccountingStorageType=accounting_storage/none"
    [ "$ACCOUNTING" = 1 ] && accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=16820
JobAcctGatherType=jobacct_gather/none"
    {
        echo "ClusterName=moelocal"
        echo "SlurmctldHost=localhost"
        echo "SlurmctldPort=$CTLD_PORT"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        # Requeued jobs wait out the job credential's lifetime before they restart.
        echo "AuthInfo=cred_expire=10"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SchedulerType=sched/backfill"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "ReturnToService=2"
        echo "MinJobAge=300"
        echo "KillWait=5"
        echo "InactiveLimit=0"
        echo "StateSaveLocation=$STATE/state"
        echo "SlurmdSpoolDir=$STATE/spool-%n"
        echo "SlurmctldPidFile=$STATE/slurmctld.pid"
        echo "SlurmdPidFile=$STATE/slurmd-%n.pid"
        echo "SlurmctldLogFile=$STATE/slurmctld.log"
        echo "SlurmdLogFile=$STATE/slurmd-%n.log"
        echo "$accounting"
        [ -n "$gres" ] && echo "$gres"
        for i in 0 1; do
            echo "NodeName=${NODES[$i]} NodeHostname=localhost Port=${NODE_PORTS[$i]} CPUs=1 RealMemory=3000 $node_gres State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF.new"
    mv "$CONF.new" "$CONF"
}

wait_idle() {
    for _ in $(seq 120); do
        local idle
        idle=$(sinfo -h -N -o "%N %T" 2>/dev/null | grep -c -E "idle|mixed|allocated" || true)
        [ "$idle" -ge 2 ] && return 0
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "the nodes did not come up; see $STATE/*.log"
}

start() {
    install_packages
    mkdir -p "$STATE"
    # The node names resolve to this machine, so MASTER_ADDR works as on a real cluster.
    for n in "${NODES[@]}"; do grep -qE "^127\.0\.0\.1\s.*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts; done
    start_munge
    local wanted="accounting=$ACCOUNTING gpus=$GPUS"
    if running "$STATE/slurmctld.pid" && [ "$(cat "$STATE/mode" 2>/dev/null)" = "$wanted" ]; then
        wait_idle
        echo "slurm-local: already running ($wanted); SLURM_CONF=$CONF"
        return 0
    fi
    stop quiet
    write_config
    echo "$wanted" > "$STATE/mode"
    [ "$ACCOUNTING" = 1 ] && start_accounting
    slurmctld -f "$CONF"
    for n in "${NODES[@]}"; do slurmd -N "$n" -f "$CONF"; done
    wait_idle
    echo "slurm-local: 2 nodes idle ($wanted); SLURM_CONF=$CONF"
}

stop() {
    for f in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid" "$STATE/slurmdbd.pid" "$STATE/mysql/mysqld.pid"; do
        [ -f "$f" ] || continue
        local pid
        pid=$(cat "$f" 2>/dev/null) || continue
        kill "$pid" 2>/dev/null || true
        # Wait for the daemon to be gone: a MariaDB still flushing holds its files' locks, and a
        # new one started beside it fails.
        for _ in $(seq 240); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$f"
    done
    [ "${1:-}" = quiet ] || echo "slurm-local: stopped"
}

ACCOUNTING=0
GPUS=0
command=${1:-}
shift || true
for arg in "$@"; do
    case "$arg" in
        --accounting) ACCOUNTING=1 ;;
        --gpus) GPUS=1 ;;
        *) die "unknown option $arg (expected --accounting or --gpus)" ;;
    esac
done
case "$command" in
    start) start ;;
    stop) stop ;;
    status) sinfo -N -o "%N %T %G" ;;
    *) die "usage: clusters/slurm-local.sh start [--accounting] [--gpus] | status | stop" ;;
esac
