#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the cluster tests (tests/cluster/): munge, slurmctld and slurmd
# from Debian's packages, with local_slurm.conf (this host, its CPUs and memory filled in). Run as root.
#   scripts/cluster/local_cluster.sh start [DIR]   # state, logs and slurm.conf under DIR; prints export SLURM_CONF=...
#   scripts/cluster/local_cluster.sh stop [DIR]    # cancels every job, stops only the daemons that start started
# Installs slurmctld, slurmd, slurm-client and munge with apt-get where they are missing.
set -euo pipefail
ACTION=${1:?start or stop}
DIR=$(realpath -m "${2:-/tmp/ssvae-slurm}")
HERE=$(cd "$(dirname "$0")" && pwd)
export SLURM_CONF="$DIR/slurm.conf"

say() { echo "local_cluster: $*" >&2; }

install_missing() {
  local missing=()
  for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair##*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

start() {
  install_missing
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge"
  local host cpus memory
  host=$(hostname -s)
  cpus=$(nproc)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  sed -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEMORY@|$memory|g" -e "s|@DIR@|$DIR|g" \
    "$HERE/local_slurm.conf" > "$SLURM_CONF"
  [ -f /etc/munge/munge.key ] || /usr/sbin/mungekey --create >/dev/null
  /usr/sbin/munged --force --socket "$DIR/munge/munge.socket" --pid-file "$DIR/munge/munged.pid" \
    --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge/munged.seed"
  /usr/sbin/slurmctld -f "$SLURM_CONF"
  /usr/sbin/slurmd -f "$SLURM_CONF"
  for _ in $(seq 60); do
    if sinfo -h -N -o "%T" 2>/dev/null | grep -qx "idle"; then
      say "up: one node ($host, $cpus CPUs); SLURM_CONF=$SLURM_CONF"
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 1
  done
  say "the node did not become idle in 60 s; see $DIR/log/"
  stop
  return 1
}

stop() {
  scancel --full --quiet --user root 2>/dev/null || true
  for pidfile in "$DIR/state/slurmd.pid" "$DIR/state/slurmctld.pid" "$DIR/munge/munged.pid"; do
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  say "stopped"
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  *) say "unknown action $ACTION (start or stop)"; exit 2 ;;
esac
