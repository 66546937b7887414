#!/usr/bin/env bash
# A single-host Slurm cluster for Continuum's tests and benchmarks, from Debian's packages (Slurm 22.05):
# munge, slurmctld and slurmd on this machine, one node "continuum" with 8 H100 GPUs as GRES (fake device
# files: Slurm counts GPUs only with files behind them) in one partition "gpu".
#
#   deploy/slurm/test-cluster.sh start    install what is missing, configure, start; wait until the node is idle
#   deploy/slurm/test-cluster.sh stop     stop the daemons
#   deploy/slurm/test-cluster.sh status   exit 0 if the cluster answers
#   deploy/slurm/test-cluster.sh restart-controller   start slurmctld again, keeping its jobs (after a test
#                                         stopped it to see what the agent does while the controller is away)
#
# Exit code 77: this machine cannot run it (not root, or no apt-get and no Slurm): tests skip with the reason.
set -euo pipefail

GPUS=${CONTINUUM_SLURM_GPUS:-8}
# more CPUs than the machine has (config_overrides): CPUs must not be what limits how many GPU jobs run
CPUS=${CONTINUUM_SLURM_CPUS:-64}
# less memory than a node of a real centre, and than the 8 GB Continuum once sent to every job unasked: a job
# that names no memory must run on it, with Slurm's own default
MEMORY_MB=${CONTINUUM_SLURM_MEMORY_MB:-4000}
CONF=/etc/slurm
NODE=continuum
SPOOL=/var/spool/continuum-slurm
LOG=/var/log/continuum-slurm

cannot() { echo "test-cluster: $*" >&2; exit 77; }

answers() { timeout 5 sinfo -h -o %T >/dev/null 2>&1; }

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || cannot "Slurm is not installed and installing it needs root"
  command -v apt-get >/dev/null || cannot "Slurm is not installed and there is no apt-get"
  echo "test-cluster: installing slurmctld slurmd slurm-client munge (Debian packages)..." >&2
  # no init system here: package scripts must not try to start daemons
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge >"${TMPDIR:-/tmp}/continuum-slurm-apt.log" 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
         --no-install-recommends slurmctld slurmd slurm-client munge >>"${TMPDIR:-/tmp}/continuum-slurm-apt.log" 2>&1; } \
    || cannot "apt-get install failed: see ${TMPDIR:-/tmp}/continuum-slurm-apt.log"
  rm -f /usr/sbin/policy-rc.d
}

configure() {
  mkdir -p "$CONF" "$SPOOL/ctld" "$SPOOL/d" "$LOG" /run/munge /etc/munge
  for i in $(seq 0 $((GPUS - 1))); do
    [ -e "/dev/continuum-gpu$i" ] || mknod "/dev/continuum-gpu$i" c 1 3  # like /dev/null
  done
  cat > "$CONF/slurm.conf" <<CONFEOF
# written by deploy/slurm/test-cluster.sh: a one-node test cluster
ClusterName=continuum-test
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=/run/continuum-slurmctld.pid
SlurmdPidFile=/run/continuum-slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# finished jobs stay visible to scontrol and squeue for 10 minutes (there is no accounting database)
MinJobAge=600
KillWait=2
OverTimeLimit=0
InactiveLimit=0
NodeName=$NODE NodeHostname=$(hostname -s) CPUs=$CPUS RealMemory=$MEMORY_MB Gres=gpu:h100:$GPUS State=UNKNOWN
PartitionName=gpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONFEOF
  echo "NodeName=$NODE Name=gpu Type=h100 File=/dev/continuum-gpu[0-$((GPUS - 1))]" > "$CONF/gres.conf"
  echo "ConstrainDevices=no" > "$CONF/cgroup.conf"
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0700 /etc/munge
  chmod 0400 /etc/munge/munge.key
}

start() {
  install
  [ "$(id -u)" = 0 ] || cannot "starting Slurm daemons needs root"
  configure
  if answers && [ "$(sinfo -h -n "$NODE" -o %c)" = "$CPUS" ] && [ "$(sinfo -h -n "$NODE" -o %m)" = "$MEMORY_MB" ] \
      && sinfo -h -o %T | grep -qE 'idle|mix|alloc'; then
    exit 0  # already up, with this configuration
  fi
  stop
  # daemons detach from this script's output, so a caller that waits for it is not held by them
  pgrep -x munged >/dev/null || (cd / && runuser -u munge -- munged </dev/null >>"$LOG/start.log" 2>&1) \
    || munged --force </dev/null >>"$LOG/start.log" 2>&1
  pgrep -x slurmctld >/dev/null || slurmctld -c -i </dev/null >>"$LOG/start.log" 2>&1
  pgrep -x slurmd >/dev/null || slurmd -c </dev/null >>"$LOG/start.log" 2>&1
  for _ in $(seq 1 60); do
    if answers && sinfo -h -n "$NODE" -o %T | grep -qE '^(idle|mixed|allocated)'; then
      echo "test-cluster: up, node $NODE with $GPUS h100 GPUs and $MEMORY_MB MB of memory" >&2
      exit 0
    fi
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "test-cluster: the node did not come up; last lines of the logs:" >&2
  tail -n 20 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true
  exit 1
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
  for _ in $(seq 1 50); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || return 0; sleep 0.1; done
}

restart_controller() {
  pgrep -x slurmctld >/dev/null || slurmctld </dev/null >>"$LOG/start.log" 2>&1
  for _ in $(seq 1 60); do answers && exit 0; sleep 0.5; done
  echo "test-cluster: slurmctld did not answer again" >&2
  exit 1
}

case "${1:-start}" in
  start) start ;;
  restart-controller) restart_controller ;;
  stop) stop ;;
  status) answers ;;
  *) echo "usage: $0 start|stop|status|restart-controller" >&2; exit 2 ;;
esac
