#!/usr/bin/env bash
# A real Slurm cluster on one machine, for tests, CI and demos:
#   munge + MariaDB + slurmdbd + slurmctld + two slurmd nodes (n1, n2) that share this host.
#
#   bash slurm/local_cluster.sh up       install (Debian packages) if needed, start everything, wait for idle nodes
#   bash slurm/local_cluster.sh down     stop the daemons (state kept)
#   bash slurm/local_cluster.sh status   one line per daemon and the node states
#   bash slurm/local_cluster.sh reset    stop, wipe job state AND the accounting DB together, start again
#
# Idempotent: `up` on a running cluster only checks it. Must run as root (it installs packages and
# writes /etc/slurm, /etc/hosts). Facts behind the settings: ../shared/design/slurm-local.md.
# Environment knobs: SLURM_LOCAL_STATE (state dir, default /var/lib/slurm-local),
# SLURM_LOCAL_MAX_ARRAY (MaxArraySize, default 11: small on purpose so tests exercise array chunking).
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/lib/slurm-local}
MAX_ARRAY=${SLURM_LOCAL_MAX_ARRAY:-11}
CLUSTER=ci
HOST=$(hostname)
CONF_DIR=/etc/slurm
SOCK=/run/mysqld/mysqld.sock
DB=slurm_acct_db

log() { printf '[local_cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"

install_packages() {
  local missing=()
  for bin in slurmctld:slurm-wlm slurmd:slurm-wlm slurmdbd:slurmdbd munged:munge mariadbd:mariadb-server; do
    command -v "${bin%%:*}" >/dev/null 2>&1 || missing+=("${bin##*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurm-wlm slurmdbd munge mariadb-server >/dev/null
}

ensure_hosts() {
  # Node names must resolve: MASTER_ADDR is the first node's *name* (n1) in multi-node jobs.
  local name
  for name in "$HOST" n1 n2; do
    getent hosts "$name" >/dev/null 2>&1 || { echo "127.0.0.1 $name" >>/etc/hosts; log "added $name to /etc/hosts"; }
  done
}

write_configs() {
  mkdir -p "$CONF_DIR" "$STATE"/{ctld,log,spool/n1,spool/n2,mysql} /run/mysqld
  cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh: two fake nodes on one host.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldPort=6817
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MailProg=/bin/true
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoreFlags=job_comment
MaxArraySize=$MAX_ARRAY
MaxJobCount=100000
ReturnToService=2
KillWait=5
MinJobAge=30
InactiveLimit=0
Waittime=0
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=8 RealMemory=16000 State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002 CPUs=8 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  # slurmdbd talks to MariaDB over its unix socket as root (socket auth): no password anywhere.
  cat >"$CONF_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB
StorageUser=root
EOF
  chmod 600 "$CONF_DIR/slurmdbd.conf"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
  local limit=$1 what=$2; shift 2
  local t0=$SECONDS
  until "$@" >/dev/null 2>&1; do
    (( SECONDS - t0 < limit )) || die "timed out after ${limit}s waiting for $what (logs: $STATE/log)"
    sleep 0.2
  done
}

start_munge() {
  if pgrep -x munged >/dev/null; then return 0; fi
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge; chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munge sh -c 'munge -n | unmunge'
}

start_mariadb() {
  if [ -S "$SOCK" ] && mariadb -uroot -e 'select 1' >/dev/null 2>&1; then return 0; fi
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$STATE/mysql" --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
  fi
  chown -R root "$STATE/mysql"
  (setsid mariadbd --user=root --datadir="$STATE/mysql" --socket="$SOCK" --bind-address=127.0.0.1 \
     --pid-file="$STATE/mariadb.pid" --log-error="$STATE/log/mariadb.log" \
     --innodb-buffer-pool-size=64M --innodb-log-file-size=16M </dev/null >/dev/null 2>&1 &)
  wait_for 60 MariaDB mariadb -uroot -e 'select 1'
}

start_slurmdbd() {
  running "$STATE/slurmdbd.pid" || slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

start_slurm() {
  running "$STATE/slurmctld.pid" || slurmctld
  wait_for 30 slurmctld scontrol ping
  local n
  for n in n1 n2; do running "$STATE/slurmd-$n.pid" || slurmd -N "$n"; done
  wait_for 60 "idle nodes n1 n2" nodes_idle
}

nodes_idle() {
  local states
  states=$(sinfo -h -N -o '%N %t' | sort -u)
  [ "$(grep -cE '^n[12] (idle|mix|alloc)$' <<<"$states")" = 2 ]
}

stop_all() {
  local f
  scancel --quiet --full --state=RUNNING -u root >/dev/null 2>&1 || true
  for f in "$STATE"/slurmd-n1.pid "$STATE"/slurmd-n2.pid "$STATE"/slurmctld.pid "$STATE"/slurmdbd.pid; do
    if running "$f"; then kill "$(cat "$f")" 2>/dev/null || true; fi
  done
  for f in slurmd slurmctld slurmdbd; do
    local t0=$SECONDS
    while pgrep -x "$f" >/dev/null && (( SECONDS - t0 < 15 )); do sleep 0.2; done
    pkill -9 -x "$f" 2>/dev/null || true
  done
  rm -f "$STATE"/*.pid
}

cmd_up() {
  install_packages
  ensure_hosts
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  log "up: $(sinfo -h -N -o '%N:%t' | sort -u | tr '\n' ' ')(MaxArraySize=$MAX_ARRAY, state $STATE)"
}

cmd_status() {
  local d rc=0
  for d in munged mariadbd slurmdbd slurmctld slurmd; do
    if pgrep -x "$d" >/dev/null; then echo "$d: running ($(pgrep -x "$d" | wc -l))"; else echo "$d: stopped"; rc=1; fi
  done
  if scontrol ping >/dev/null 2>&1; then sinfo -N -o '%N %t %c %m'; else echo "slurmctld: not answering"; rc=1; fi
  return $rc
}

cmd_reset() {
  stop_all
  rm -rf "$STATE"/ctld "$STATE"/spool
  if mariadb -uroot -e 'select 1' >/dev/null 2>&1; then
    mariadb -uroot -e "DROP DATABASE IF EXISTS $DB"
  fi
  log "job state and accounting DB wiped"
  cmd_up
}

case "${1:-}" in
  up) cmd_up ;;
  down) stop_all; log "slurm daemons stopped (munge and MariaDB left running)" ;;
  status) cmd_status ;;
  reset) cmd_reset ;;
  *) echo "usage: $0 up|down|status|reset" >&2; exit 2 ;;
esac
