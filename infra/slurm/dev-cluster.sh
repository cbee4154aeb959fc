#!/usr/bin/env bash
# A one-machine SLURM cluster on loopback, for development and CI (Debian, run as root).
#
#   infra/slurm/dev-cluster.sh up   [STATE_DIR]   # install if needed, start, wait until idle
#   infra/slurm/dev-cluster.sh env  [STATE_DIR]   # print `export SLURM_CONF=...` for this shell
#   infra/slurm/dev-cluster.sh down [STATE_DIR]   # cancel its jobs, stop what `up` started
#
# STATE_DIR defaults to $SLURM_DEV_DIR or /tmp/dino-slurm-dev. Everything lives there: the
# configuration (etc/slurm.conf), logs, daemon state and pid files. Nothing is written to
# /etc/slurm, so a second dev cluster in another STATE_DIR does not collide with this one;
# clients find this cluster through SLURM_CONF:
#
#   eval "$(infra/slurm/dev-cluster.sh env)"; sinfo; sbatch ...
#
# What runs: munged (its own socket), MariaDB + slurmdbd (accounting, so `sacct` and
# submitit's state polling work; SLURM_DEV_ACCT=0 leaves them out), slurmctld and one slurmd
# (node `localhost`) on free loopback ports. The node has every CPU of this machine and
# SLURM_DEV_GPUS (default 1) fake GPUs: a GRES backed by /dev/null, enough for the scheduler.
#
# Partitions: `debug` (default, PriorityTier=1) is preemptible: a job in `high`
# (PriorityTier=10) that needs its resources preempts it. PreemptMode=REQUEUE with
# GraceTime=SLURM_DEV_GRACE seconds (default 60) and preempt_send_user_signal, so a preempted
# job first receives its --signal (USR2 for dino-cluster jobs) and can checkpoint.
#
# Known behaviour (Slurm 22.05): a requeued job waits ~2 minutes before it may start again
# (its BeginTime); `scontrol update jobid=N starttime=now` lets it start at once.
set -euo pipefail

cmd=${1:-}
D=${2:-${SLURM_DEV_DIR:-/tmp/dino-slurm-dev}}
ACCT=${SLURM_DEV_ACCT:-1}
GPUS=${SLURM_DEV_GPUS:-1}
GRACE=${SLURM_DEV_GRACE:-60}
CLUSTER=${SLURM_DEV_CLUSTER:-dev}

usage() { sed -n '2,8p' "$0" >&2; exit 2; }
log() { echo "[dev-cluster] $*" >&2; }

wait_for() {  # wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then log "timed out waiting for: $*"; return 1; fi
    sleep 0.2
  done
}

free_port() {  # a TCP port nobody listens on right now (the daemons bind it within seconds)
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local pkgs=(slurm-wlm munge) missing=()
  [ "$ACCT" = 1 ] && pkgs+=(slurmdbd mariadb-server)
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
  install -d -o munge -g munge -m 0755 "$D/munge"
  local key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then
    key="$D/munge/munge.key"
    runuser -u munge -- mungekey -c -k "$key"
  fi
  runuser -u munge -- /usr/sbin/munged --socket="$D/munge/munge.socket" --key-file="$key" \
    --pid-file="$D/munge/munged.pid" --log-file="$D/munge/munged.log" \
    --seed-file="$D/munge/munged.seed"
  wait_for 20 bash -c "munge -S '$D/munge/munge.socket' -n | unmunge -S '$D/munge/munge.socket'"
  ln -sf "$D/munge/munged.pid" "$D/munged.pid"
}

start_accounting() {
  local dbport=$1 dbdport=$2
  install -d -o mysql -g mysql -m 0750 "$D/mysql"
  mariadb-install-db --no-defaults --user=mysql --datadir="$D/mysql" --skip-test-db \
    --auth-root-authentication-method=socket --innodb-log-file-size=16M \
    >"$D/log/mariadb-install.log" 2>&1
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$D/mysql" \
    --socket="$D/mysql/mysqld.sock" --port="$dbport" --bind-address=127.0.0.1 \
    --skip-name-resolve --innodb-log-file-size=16M --pid-file="$D/mysql/mariadb.pid" \
    >"$D/log/mariadb.log" 2>&1 </dev/null &
  local mpid=$!
  local sql=(mariadb --no-defaults -S "$D/mysql/mysqld.sock" -u root)
  wait_for 60 bash -c "kill -0 $mpid || exit 0; ${sql[*]} -e 'select 1'"
  kill -0 "$mpid" 2>/dev/null || { tail -n 5 "$D/log/mariadb.log" >&2; exit 1; }
  ln -sf "$D/mysql/mariadb.pid" "$D/mariadb.pid"
  "${sql[@]}" -e "CREATE DATABASE slurm_acct_db; CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY
    'slurmdev'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  cat >"$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbdport
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$dbport
StorageUser=slurm
StoragePass=slurmdev
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$D/etc/slurmdbd.conf"
  slurmdbd
  wait_for 30 bash -c "ss -ltn | grep -q ':$dbdport '"
}

write_slurm_conf() {
  local ctldport=$1 slurmdport=$2 dbdport=$3 cpus mem acct
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  if [ "$ACCT" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbdport
# With slurmdbd this names the munge socket used for the accounting connection.
AccountingStoragePass=$D/munge/munge.socket
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux"
  else
    acct="AccountingStorageType=accounting_storage/none"
  fi
  cat >"$D/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctldport
SlurmdPort=$slurmdport
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
# No cgroups in containers: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default memory per CPU every job asks for the whole node and they run one by one.
DefMemPerCPU=1024
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=15
$acct
GresTypes=gpu
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE
PartitionName=high Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  # A GPU GRES needs File= (count-only GPUs are dropped and the node drains); any device works.
  : >"$D/etc/gres.conf"
  for _ in $(seq 1 "$GPUS"); do echo "NodeName=localhost Name=gpu File=/dev/null" >>"$D/etc/gres.conf"; done
}

up() {
  [ "$(id -u)" -eq 0 ] || { log "must run as root (starts system daemons as root/munge/mysql)"; exit 1; }
  install_packages
  down_quiet
  # A failed start stops whatever did start, by pid, and says where the logs are.
  trap 'log "up failed: logs under $D/log"; down_quiet' EXIT
  rm -rf "$D"
  mkdir -p "$D"/{etc,state,spool,log}
  chmod 0755 "$D"
  export SLURM_CONF="$D/etc/slurm.conf"
  local ctldport slurmdport dbport="" dbdport=""
  ctldport=$(free_port); slurmdport=$(free_port)
  start_munge
  if [ "$ACCT" = 1 ]; then
    dbport=$(free_port); dbdport=$(free_port)
    # slurmdbd reads slurmdbd.conf next to $SLURM_CONF
    start_accounting "$dbport" "$dbdport"
  fi
  write_slurm_conf "$ctldport" "$slurmdport" "$dbdport"
  [ "$ACCT" = 1 ] && { sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true; }
  slurmctld
  slurmd -N localhost
  wait_for 60 bash -c "sinfo -h -n localhost -o %t | grep -qx idle" || {
    tail -n 20 "$D/log/slurmctld.log" "$D/log/slurmd.log" >&2; exit 1; }
  trap - EXIT
  sinfo -N -o '%N %P %t %c %m %G' >&2
  log "up: export SLURM_CONF=$SLURM_CONF"
}

down_quiet() {
  [ -d "$D" ] || return 0
  if pid_alive "$D/slurmctld.pid"; then
    # Cancel this cluster's jobs first so no training process outlives the cluster.
    SLURM_CONF="$D/etc/slurm.conf" scancel --full --user="$(id -un)" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while [ -n "$(SLURM_CONF="$D/etc/slurm.conf" squeue -h -t R,CG -o %i 2>/dev/null)" ] &&
          [ "$SECONDS" -lt "$deadline" ]; do sleep 0.3; done
  fi
  # Daemons first, then what they depend on; each group is stopped together (faster).
  stop_pids slurmd slurmctld
  stop_pids slurmdbd mariadb munged
}

stop_pids() {  # stop_pids NAME...: TERM each $D/NAME.pid whose process is still that daemon
  local name pid pids=()
  for name in "$@"; do
    local f="$D/$name.pid"
    [ -e "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    # A stale pid file may name a reused pid: only signal a process that is the daemon.
    if [ -n "$pid" ] && grep -q "${name%db}" "/proc/$pid/comm" 2>/dev/null; then
      kill "$pid" 2>/dev/null && pids+=("$pid")
    fi
    rm -f "$f"
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  done
}

case "$cmd" in
  up) up ;;
  down) down_quiet; log "down: $D" ;;
  env) echo "export SLURM_CONF=$D/etc/slurm.conf" ;;
  *) usage ;;
esac
