#!/usr/bin/env bash
# A real Slurm cluster on one machine, for tests, CI and demos:
#   munge + MariaDB + slurmdbd + slurmctld + two slurmd nodes (n1, n2) that share this host.
#
#   bash slurm/local_cluster.sh up         install (Debian packages) if needed, start everything, wait for idle nodes
#   bash slurm/local_cluster.sh down       stop its Slurm daemons (state kept; MariaDB and munge keep running)
#   bash slurm/local_cluster.sh down --all also stop its MariaDB, and munged if it started it
#   bash slurm/local_cluster.sh status     one line per daemon of its own, the node states, any other Slurm daemon seen
#   bash slurm/local_cluster.sh reset      stop, wipe job state AND the accounting DB together, start again
#   bash slurm/local_cluster.sh conf       print its slurm.conf path: export SLURM_CONF=$(bash slurm/local_cluster.sh conf)
#
# It never touches another Slurm of this machine (a lab workstation's own, a real cluster's node):
#   - Its configuration lives in its state dir $STATE (default /var/lib/slurm-local): etc/slurm.conf and
#     etc/slurmdbd.conf (no cgroup.conf: proctrack/linuxproc, task/none). Daemons start with `-f etc/slurm.conf`
#     and SLURM_CONF=etc/slurm.conf (slurmdbd reads the slurmdbd.conf next to it); clients need
#     SLURM_CONF=$STATE/etc/slurm.conf (`bash slurm/local_cluster.sh conf` prints it). tests/run.sh and
#     tests/conftest.py export it; launchers/_common.py sets it when SLURM_CONF is unset, /etc/slurm/slurm.conf
#     does not exist and this file does; jobs inherit it from sbatch (so `scontrol requeue` inside a job works).
#     Its own MariaDB: datadir mysql/, socket run/mysqld.sock, no TCP port, no my.cnf read (--no-defaults).
#     Pid files in run/, logs in log/. It writes nothing under /etc/slurm; it uses the machine's munge
#     (creates /etc/munge/munge.key only when there is none, starts munged only when none answers).
#   - /etc/hosts: node names must resolve (MASTER_ADDR is the first node's *name*, n1), so for each of n1, n2
#     and this host that does not resolve it APPENDS `127.0.0.1 <name>  # medhpc-local-cluster`; it never
#     rewrites other lines, and `down` leaves its marked lines in place.
#   - It stops only the processes named in its own pid files (never by process name): slurmctld, slurmd n1/n2,
#     slurmdbd; with `down --all` also its MariaDB and munged if it started that one (run/munged.pid). It
#     cancels only the running jobs of its own controller (SLURM_CONF=its conf, only while that one is alive).
#   - `up` and `reset` REFUSE (exit 3, one line naming what was found, nothing changed) when a Slurm it did not
#     set up is configured or running: /etc/slurm/slurm.conf or slurmdbd.conf (or /etc/slurm-llnl/...) that
#     it did not write, or a slurmctld / slurmd / slurmdbd process (by name or argv[0]) that is not one of its
#     pids (nor their child). Files an older version of this script wrote to /etc/slurm (header
#     `# Written by slurm/local_cluster.sh`, or exactly the slurmdbd.conf it wrote) count as its own: `up`
#     stops the daemons started from them (by their pid files in $STATE), moves them to $STATE/etc/legacy/
#     and carries on. A symbolic link /etc/slurm/slurm.conf -> its own etc/slurm.conf (made by hand so that
#     plain clients find it) is its own too, and left alone.
#
# Idempotent: `up` on a running cluster only checks it. Must run as root (it installs packages, starts daemons,
# may append to /etc/hosts). Facts behind the settings: ../shared/design/slurm-local.md.
# Environment knobs: SLURM_LOCAL_STATE (state dir, default /var/lib/slurm-local),
# SLURM_LOCAL_MAX_ARRAY (MaxArraySize, default 11: small on purpose so tests exercise array chunking).
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/lib/slurm-local}
MAX_ARRAY=${SLURM_LOCAL_MAX_ARRAY:-11}
CLUSTER=ci
HOST=$(hostname)
ETC=$STATE/etc
RUN=$STATE/run
CONF=$ETC/slurm.conf
DBD_CONF=$ETC/slurmdbd.conf
DB_SOCK=$RUN/mysqld.sock
DB=slurm_acct_db
HEADER="# Written by slurm/local_cluster.sh"
HOSTS_MARK="# medhpc-local-cluster"
SYSTEM_CONFS=(/etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf /etc/slurm-llnl/slurm.conf /etc/slurm-llnl/slurmdbd.conf)
# "name pidfile" of every daemon it starts, and of those older versions of this script started
OWN=("munged $RUN/munged.pid" "mariadbd $RUN/mariadb.pid" "slurmdbd $RUN/slurmdbd.pid"
     "slurmctld $RUN/slurmctld.pid" "slurmd $RUN/slurmd-n1.pid" "slurmd $RUN/slurmd-n2.pid")
LEGACY=("slurmd $STATE/slurmd-n1.pid" "slurmd $STATE/slurmd-n2.pid" "slurmctld $STATE/slurmctld.pid"
        "slurmdbd $STATE/slurmdbd.pid" "mariadbd $STATE/mariadb.pid")

export SLURM_CONF=$CONF   # every Slurm client and daemon below uses this cluster's file, whatever the caller set
unset SLURM_CONF_SERVER

log() { printf '[local_cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"; }

# ------------------------------------------------------------------ whose process is it
alive() { # alive PID NAME: a live (non-zombie) process with that command name
  local line stat comm
  line=$(ps -o stat=,comm= -p "$1" 2>/dev/null) || return 1
  read -r stat comm <<<"$line"
  [ "$comm" = "$2" ] && [ "${stat:0:1}" != Z ]
}

pid_in() { # pid_in NAME PIDFILE: prints the pid when the file names a live process called NAME
  local pid
  [ -s "$2" ] || return 1
  pid=$(tr -dc '0-9' <"$2")
  [ -n "$pid" ] && alive "$pid" "$1" || return 1
  echo "$pid"
}

own_pids() { # every live pid from its pid files (this version's and older ones')
  local e
  for e in "${OWN[@]}" "${LEGACY[@]}"; do pid_in ${e%% *} "${e#* }" || true; done
}

foreign_daemons() { # one line per slurmctld / slurmd / slurmdbd process that is neither its own nor a child of one
  local own pid ppid comm args base
  own=" $(own_pids | tr '\n' ' ') "
  while read -r pid ppid stat comm args; do
    [ "${stat:0:1}" = Z ] && continue  # a zombie is a process that has ended
    base=${args%% *}; base=${base##*/}
    case "$comm $base" in slurmctld\ *|slurmd\ *|slurmdbd\ *|*\ slurmctld|*\ slurmd|*\ slurmdbd) ;; *) continue ;; esac
    [[ $own == *" $pid "* || $own == *" $ppid "* ]] && continue
    echo "a $comm process (pid $pid: $(cut -c1-60 <<<"$args"))"
  done < <(ps -eo pid=,ppid=,stat=,comm=,args=)
}

# ------------------------------------------------------------------ whose file is it
legacy_dbd_conf() { # exactly what older versions of this script wrote to /etc/slurm/slurmdbd.conf (no header)
  cat <<EOF
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
}

legacy_own() { # legacy_own FILE: written by an older version of this script
  [ "$(head -c ${#HEADER} "$1" 2>/dev/null)" = "$HEADER" ] && return 0
  [ "${1##*/}" = slurmdbd.conf ] && [ "$(cat "$1" 2>/dev/null)" = "$(legacy_dbd_conf)" ]
}

links_to_own() { # links_to_own FILE: a symbolic link to its own config (made by hand, so plain clients find it)
  [ -L "$1" ] && { [ "$(readlink -f "$1")" = "$(readlink -f "$CONF")" ] || [ "$(readlink -f "$1")" = "$(readlink -f "$DBD_CONF")" ]; }
}

refuse_foreign() { # exit 3 when a Slurm this script did not set up is configured or running here
  local f line found=""
  for f in "${SYSTEM_CONFS[@]}"; do
    if [ -e "$f" ] && ! links_to_own "$f" && ! legacy_own "$f"; then found+="; $f, which it did not write"; fi
  done
  while IFS= read -r line; do [ -n "$line" ] && found+="; $line, which it did not start"; done < <(foreign_daemons)
  [ -z "$found" ] && return 0
  log "refusing to start: this machine has a Slurm of its own: ${found#; }. The local cluster runs only where no other Slurm is configured or running: use that Slurm (its own cluster profile), or remove/stop it first. Nothing was changed."
  exit 3
}

# ------------------------------------------------------------------ stopping (by pid file only)
STOPPED=()
stop_pidfiles() { # stop_pidfiles "NAME PIDFILE"...: TERM each live one, wait, then KILL that same pid
  local e pid t0 waiting=()
  for e in "$@"; do
    if pid=$(pid_in ${e%% *} "${e#* }"); then
      kill "$pid" 2>/dev/null || true; waiting+=("$pid ${e%% *}"); STOPPED+=("${e%% *}($pid)")
    fi
  done
  t0=$SECONDS
  for e in "${waiting[@]}"; do
    while alive $e && (( SECONDS - t0 < 30 )); do sleep 0.2; done
    if alive $e; then kill -9 "${e%% *}" 2>/dev/null || true; log "killed ${e#* } (pid ${e%% *}) after 30 s"; fi
  done
  for e in "$@"; do rm -f "${e#* }"; done
}

cancel_running() { # cancel running jobs of its own controller only, and only while that controller is its own
  local conf=""
  if pid_in slurmctld "$RUN/slurmctld.pid" >/dev/null; then conf=$CONF
  elif pid_in slurmctld "$STATE/slurmctld.pid" >/dev/null; then  # started by an older version from /etc/slurm
    for conf in /etc/slurm/slurm.conf "$ETC/legacy/slurm.conf" ""; do [ -z "$conf" ] || [ -f "$conf" ] && break; done
  fi
  [ -n "$conf" ] || return 0
  SLURM_CONF=$conf scancel --quiet --full --state=RUNNING >/dev/null 2>&1 || true
  # let them end (KillWait=5) before slurmd goes: a slurmd stopped under an ending job drains its node
  local t0=$SECONDS
  while [ -n "$(SLURM_CONF=$conf squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && (( SECONDS - t0 < 30 )); do
    sleep 0.5
  done
}

stop_slurm() {
  cancel_running
  stop_pidfiles "${OWN[@]:2}" "${LEGACY[@]:0:4}"
}

migrate_legacy() { # older versions wrote /etc/slurm and ran daemons from it: stop those, move the files aside
  local f e moved=() live=""
  for f in "${SYSTEM_CONFS[@]}"; do if [ -e "$f" ] && ! links_to_own "$f" && legacy_own "$f"; then moved+=("$f"); fi; done
  for e in "${LEGACY[@]}"; do pid_in ${e%% *} "${e#* }" >/dev/null && live=1; done
  [ ${#moved[@]} -gt 0 ] || [ -n "$live" ] || return 0
  if [ -n "$live" ]; then
    log "stopping the daemons an older version of this script started from /etc/slurm (their pid files in $STATE)"
    cancel_running
    stop_pidfiles "${LEGACY[@]}"
  fi
  if [ ${#moved[@]} -gt 0 ]; then
    mkdir -p "$ETC/legacy"
    for f in "${moved[@]}"; do
      local dest="$ETC/legacy/${f##*/}"
      [ -e "$dest" ] && dest+=".$(date +%Y%m%d-%H%M%S)"
      mv "$f" "$dest"
    done
    log "moved ${moved[*]} (written by an older version of this script) to $ETC/legacy/; its config is now $CONF"
  fi
}

# ------------------------------------------------------------------ setting up
INSTALLED=""
install_packages() {
  local missing=()
  for bin in slurmctld:slurm-wlm slurmd:slurm-wlm slurmdbd:slurmdbd munged:munge mariadbd:mariadb-server; do
    command -v "${bin%%:*}" >/dev/null 2>&1 || missing+=("${bin##*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  INSTALLED=1
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurm-wlm slurmdbd munge mariadb-server >/dev/null
}

ensure_hosts() { # only ever appends its own marked lines; never rewrites /etc/hosts
  local name addr
  for name in "$HOST" n1 n2; do
    if addr=$(getent hosts "$name" 2>/dev/null); then
      case "$addr" in 127.*|::1*) ;; *) log "warning: $name resolves to ${addr%% *}, not this machine: 2-node jobs may fail" ;; esac
      continue
    fi
    if [ -s /etc/hosts ] && [ -n "$(tail -c1 /etc/hosts)" ]; then echo >>/etc/hosts; fi
    printf '127.0.0.1 %s  %s\n' "$name" "$HOSTS_MARK" >>/etc/hosts
    log "added '127.0.0.1 $name  $HOSTS_MARK' to /etc/hosts (down leaves it)"
  done
}

write_file() { # write_file PATH MODE < content: replaced in one rename, so a reader never sees half a file
  (umask 077; cat >"$1.tmp")
  chmod "$2" "$1.tmp"
  mv -f "$1.tmp" "$1"
}

write_configs() {
  mkdir -p "$ETC" "$RUN" "$STATE"/{ctld,log,spool/n1,spool/n2,mysql}
  write_file "$CONF" 644 <<EOF
$HEADER: two fake nodes on one host.
# Its own file (clients: SLURM_CONF=$CONF); it never writes /etc/slurm.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
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
AccountingStoragePort=6819
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
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=1-00:00:00 State=UP OverSubscribe=NO
EOF
  # slurmdbd reads slurmdbd.conf next to SLURM_CONF; it talks to its own MariaDB over that server's unix socket
  # (MYSQL_UNIX_PORT) as root (socket auth): no password anywhere.
  write_file "$DBD_CONF" 600 <<EOF
$HEADER (slurmdbd of the local cluster)
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB
StorageUser=root
EOF
}

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
  local limit=$1 what=$2; shift 2
  local t0=$SECONDS
  until "$@" 9>&2 >/dev/null 2>&1; do  # the command's output is hidden; fd 9 is the caller's stderr
    (( SECONDS - t0 < limit )) || die "timed out after ${limit}s waiting for $what (logs: $STATE/log)"
    sleep 0.2
  done
}

munge_ok() { munge -n | unmunge; }

start_munge() { # the machine's munge (default socket, /etc/munge/munge.key): one is started only when none
  # answers, and then its pid is recorded in run/munged.pid so that `down --all` stops that one and no other
  munge_ok >/dev/null 2>&1 && return 0
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    log "created /etc/munge/munge.key (there was none)"
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge; chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  wait_for 10 munge munge_ok
  cp /run/munge/munged.pid "$RUN/munged.pid"
}

db() { mariadb --no-defaults --socket="$DB_SOCK" -uroot "$@"; }

start_mariadb() { # its own server: own datadir and socket, no TCP port, no my.cnf
  if ! pid_in mariadbd "$RUN/mariadb.pid" >/dev/null; then
    if [ ! -d "$STATE/mysql/mysql" ]; then
      mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" --skip-test-db \
        >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (log: $STATE/log/mariadb-install.log)"
    fi
    chown -R root "$STATE/mysql"
    (setsid mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$DB_SOCK" --skip-networking \
       --pid-file="$RUN/mariadb.pid" --log-error="$STATE/log/mariadb.log" \
       --innodb-buffer-pool-size=64M --innodb-log-file-size=16M </dev/null >/dev/null 2>&1 &)
  fi
  wait_for 60 MariaDB db -e 'select 1'
}

start_slurmdbd() {
  pid_in slurmdbd "$RUN/slurmdbd.pid" >/dev/null || MYSQL_UNIX_PORT=$DB_SOCK slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

start_slurm() {
  pid_in slurmctld "$RUN/slurmctld.pid" >/dev/null || slurmctld -f "$CONF"
  wait_for 30 slurmctld scontrol ping
  local n
  for n in n1 n2; do pid_in slurmd "$RUN/slurmd-$n.pid" >/dev/null || slurmd -f "$CONF" -N "$n"; done
  wait_for 60 "idle nodes n1 n2" nodes_ready
}

nodes_ready() { # idle (or in use); its own nodes left drained by an earlier stop ("Kill task failed") are resumed
  nodes_idle && return 0
  local drained
  drained=$(sinfo -h -N -t drain -o '%N' 2>/dev/null | sort -u | paste -sd, -)
  if [ -n "$drained" ]; then
    log "resuming its drained nodes $drained ($(sinfo -h -R -o '%E' 2>/dev/null | sort -u | paste -sd';' -))" 2>&9
    scontrol update NodeName="$drained" State=RESUME >/dev/null 2>&1 || true
  fi
  return 1
}

nodes_idle() {
  local states
  states=$(sinfo -h -N -o '%N %t' | sort -u)
  [ "$(grep -cE '^n[12] (idle|mix|alloc)$' <<<"$states")" = 2 ]
}

# ------------------------------------------------------------------ commands
cmd_up() {
  need_root
  refuse_foreign
  install_packages
  [ -z "$INSTALLED" ] || refuse_foreign   # a package may have started a daemon of its own
  migrate_legacy
  ensure_hosts
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  log "up: $(sinfo -h -N -o '%N:%t' | sort -u | tr '\n' ' ')(MaxArraySize=$MAX_ARRAY, state $STATE; clients: export SLURM_CONF=$CONF)"
}

cmd_down() {
  need_root
  stop_slurm
  [ "${1:-}" = --all ] && stop_pidfiles "${OWN[@]:0:2}" "${LEGACY[4]}"
  log "stopped ${STOPPED[*]:-nothing (none of its daemons was running)}; nothing else$([ "${1:-}" = --all ] || echo "; its MariaDB (and munged, if it started one) left running: down --all stops them")"
}

cmd_status() {
  local e pid rc=0 line
  for e in "${OWN[@]}"; do
    local name=${e%% *} file=${e#* } label=${e%% *}
    [ "$name" = slurmd ] && { label=${file##*/}; label="slurmd ${label#slurmd-}"; label=${label%.pid}; }
    if pid=$(pid_in "$name" "$file"); then echo "$label: running (pid $pid)"
    elif [ "$name" = munged ] && munge_ok >/dev/null 2>&1; then echo "munged: running (the machine's own, not started by this script)"
    else echo "$label: stopped"; rc=1; fi
  done
  for e in "${LEGACY[@]}"; do
    if pid=$(pid_in ${e%% *} "${e#* }"); then echo "${e%% *}: pid $pid started by an older version of this script (up replaces it)"; fi
  done
  while IFS= read -r line; do [ -n "$line" ] && echo "not ours: $line"; done < <(foreign_daemons)
  if scontrol ping >/dev/null 2>&1; then sinfo -N -o '%N %t %c %m'; else echo "slurmctld: not answering"; rc=1; fi
  echo "config: SLURM_CONF=$CONF"
  return $rc
}

cmd_reset() {
  need_root
  refuse_foreign
  migrate_legacy
  stop_slurm
  rm -rf "$STATE"/ctld "$STATE"/spool
  if [ -d "$STATE/mysql/mysql" ]; then  # its own MariaDB only (its datadir, its socket)
    mkdir -p "$RUN" "$STATE/log"
    start_mariadb
    db -e "DROP DATABASE IF EXISTS $DB"
  fi
  log "job state and accounting DB wiped"
  cmd_up
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down "${2:-}" ;;
  status) cmd_status ;;
  reset) cmd_reset ;;
  conf) echo "$CONF" ;;
  *) echo "usage: $0 up|down [--all]|status|reset|conf" >&2; exit 2 ;;
esac
