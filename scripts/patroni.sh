#!/usr/bin/env bash
# A throwaway highly available PostgreSQL on loopback: a three-member etcd cluster and
# PostgreSQL members managed by Patroni (Debian's packages), all in DIR, on free loopback ports,
# owned by an unprivileged user (nobody when run as root), with fsync off (it holds test data).
# Replication is synchronous (Patroni's synchronous_mode), so a commit the daemon saw survives
# a failover, and Patroni fails over at once when the primary's PostgreSQL crashes
# (primary_start_timeout 0) instead of restarting it in place. docs/FLEET.md, "High
# availability", describes the setup; crates/cli/tests/daemon_ha.rs uses it.
#
#   scripts/patroni.sh start DIR [MEMBERS]  create and start it (MEMBERS: 2 or 3 PostgreSQL
#                                           members, default 3); waits for a leader and a
#                                           synchronous standby; prints the URL for moat serve
#                                           --store, which reaches whichever member is primary
#   scripts/patroni.sh url DIR              that URL again
#   scripts/patroni.sh status DIR           one line per member: NAME ROLE API_URL PG_PORT PID
#                                           (ROLE from its REST API: primary, sync, replica or
#                                           down; PID: its postmaster's, or -)
#   scripts/patroni.sh stop DIR             stop every process it started (DIR stays)
set -euo pipefail

usage() {
  echo "usage: $0 start DIR [MEMBERS] | url DIR | status DIR | stop DIR" >&2
  exit 2
}
cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || usage
# The members' configuration names paths in it: absolute, whatever the caller's directory.
dir=$(realpath -m -- "$dir")

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
need() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "$1 is missing: run scripts/install-deps.sh (Debian package $2)" >&2
    exit 1
  }
}

# As root, everything runs as nobody (initdb refuses root); otherwise as whoever runs this.
# RUNAS becomes the prefix that does it with HOME $1 and an otherwise clean environment (no
# PATRONI_* or PG* variable of the caller's leaks into the members). setpriv and env exec in
# place, so the pid of a launched program is its own.
runas() {
  RUNAS=()
  if [ "$(id -u)" = 0 ]; then
    RUNAS=(setpriv --reuid="$(id -u nobody)" --regid="$(id -g nobody)" --clear-groups --)
  fi
  RUNAS+=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME="$1")
}

# Runs PROGRAM… ($2…) as the owner, with HOME $1.
as() {
  runas "$1"
  shift
  "${RUNAS[@]}" "$@"
}

# Starts PROGRAM… ($4…) as the owner with HOME $3, in a session of its own so that stop can
# end it with all it forked, logging to $1; records its pid in $2.
launch() {
  local log=$1 pidfile=$2
  runas "$3"
  shift 3
  setsid "${RUNAS[@]}" "$@" </dev/null >"$log" 2>&1 &
  echo $! >"$pidfile"
  # Not a job of this shell: stop's kills are not reported as its jobs' deaths.
  disown $!
}

# Free loopback TCP ports, $1 of them, held open together while chosen so that they differ.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Whether process $1 runs: a zombie (dead, not yet reaped by init) does not.
alive() {
  local stat
  [ -n "${1:-}" ] && stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# HTTP status of a member's REST API endpoint ($1: port, $2: path), 000 when it does not
# answer.
api() {
  curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$1$2" || true
}

# Waits (at most $1 seconds) until the command $2… succeeds, polling every 0.2 s; $what names
# what is awaited in the error, which shows the logs.
wait_for() {
  local limit=$1
  shift
  local deadline=$((SECONDS + limit))
  until "$@"; do
    if [ $SECONDS -ge $deadline ]; then
      echo "patroni.sh: no $what within ${limit}s; logs in $dir:" >&2
      tail -n 20 "$dir"/*.log "$dir"/*/*.log >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
}

# The cluster's layout, written by start: ETCD_CLIENT, ETCD_PEER, PG_PORTS, API_PORTS (lists).
load() {
  [ -f "$dir/cluster.env" ] || {
    echo "patroni.sh: $dir holds no cluster (start it first)" >&2
    exit 1
  }
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
  read -r -a etcd_client <<<"$ETCD_CLIENT"
  read -r -a etcd_peer <<<"$ETCD_PEER"
  read -r -a pg_ports <<<"$PG_PORTS"
  read -r -a api_ports <<<"$API_PORTS"
}

url() {
  local hosts=() p
  for p in "${pg_ports[@]}"; do hosts+=("127.0.0.1:$p"); done
  local IFS=,
  echo "postgres://moat@${hosts[*]}/moat?target_session_attrs=read-write&connect_timeout=5"
}

etcd_endpoints() {
  local eps=() p
  for p in "${etcd_client[@]}"; do eps+=("http://127.0.0.1:$p"); done
  local IFS=,
  echo "${eps[*]}"
}

etcd_healthy() {
  ETCDCTL_API=3 etcdctl --endpoints="$(etcd_endpoints)" --command-timeout=2s endpoint health \
    >/dev/null 2>&1
}

# The postmaster of member $1 (1-based), if one runs.
postmaster_pid() {
  local f="$dir/pg$1/data/postmaster.pid" pid
  [ -f "$f" ] || return 1
  pid=$(head -n1 "$f")
  alive "$pid" && echo "$pid"
}

role() {
  local port=$1
  if [ "$(api "$port" /primary)" = 200 ]; then
    echo primary
  elif [ "$(api "$port" /sync)" = 200 ]; then
    echo sync
  elif [ "$(api "$port" /replica)" = 200 ]; then
    echo replica
  else
    echo down
  fi
}

has_primary() {
  local p
  for p in "${api_ports[@]}"; do
    [ "$(api "$p" /primary)" = 200 ] && return 0
  done
  return 1
}

# A primary, and every other member a running replica, one of them synchronous: from then on
# a commit is on two members.
settled() {
  local p primaries=0 sync=0 replicas=0
  for p in "${api_ports[@]}"; do
    case $(role "$p") in
      primary) primaries=$((primaries + 1)) ;;
      sync) sync=$((sync + 1)); replicas=$((replicas + 1)) ;;
      replica) replicas=$((replicas + 1)) ;;
    esac
  done
  [ $primaries = 1 ] && [ $sync -ge 1 ] && [ $replicas = $((${#api_ports[@]} - 1)) ]
}

start() {
  local members=${1:-3}
  case $members in 2 | 3) ;; *)
    echo "patroni.sh: MEMBERS is 2 or 3 (PostgreSQL members; etcd always has 3), not $members" >&2
    exit 2
    ;;
  esac
  need etcd etcd-server
  need etcdctl etcd-client
  need patroni patroni
  need setpriv util-linux
  need curl curl
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "PostgreSQL's initdb is missing: run scripts/install-deps.sh (Debian package postgresql)" >&2
    exit 1
  fi
  if [ -f "$dir/cluster.env" ]; then
    echo "patroni.sh: $dir already holds a cluster (stop it and remove DIR first)" >&2
    exit 1
  fi
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown nobody: "$dir"
  local ports
  read -r -a ports <<<"$(free_ports $((6 + 2 * members)))"
  local api_from=$((6 + members))
  cat >"$dir/cluster.env" <<ENV
ETCD_CLIENT="${ports[*]:0:3}"
ETCD_PEER="${ports[*]:3:3}"
PG_PORTS="${ports[*]:6:members}"
API_PORTS="${ports[*]:api_from:members}"
ENV
  load
  # A start that fails half-way leaves nothing running.
  trap 'echo "patroni.sh: start failed; stopping what it started" >&2; stop' EXIT

  local i initial=() token
  for i in 1 2 3; do initial+=("e$i=http://127.0.0.1:${etcd_peer[i - 1]}"); done
  token="moat-$(basename "$dir")-$$"
  for i in 1 2 3; do
    as "$dir" mkdir -p "$dir/etcd$i"
    launch "$dir/etcd$i.log" "$dir/etcd$i.pid" "$dir/etcd$i" etcd \
      --name "e$i" --data-dir "$dir/etcd$i/data" \
      --listen-client-urls "http://127.0.0.1:${etcd_client[i - 1]}" \
      --advertise-client-urls "http://127.0.0.1:${etcd_client[i - 1]}" \
      --listen-peer-urls "http://127.0.0.1:${etcd_peer[i - 1]}" \
      --initial-advertise-peer-urls "http://127.0.0.1:${etcd_peer[i - 1]}" \
      --initial-cluster "$(IFS=,; echo "${initial[*]}")" \
      --initial-cluster-token "$token" --initial-cluster-state new
  done
  what="healthy etcd cluster" wait_for 60 etcd_healthy

  local hosts=() p
  for p in "${etcd_client[@]}"; do hosts+=("127.0.0.1:$p"); done
  for i in $(seq 1 "$members"); do
    as "$dir" mkdir -p "$dir/pg$i"
    as "$dir" tee "$dir/pg$i/patroni.yml" >/dev/null <<YML
scope: moat
namespace: /moat-ha/
name: pg$i
restapi:
  listen: 127.0.0.1:${api_ports[i - 1]}
  connect_address: 127.0.0.1:${api_ports[i - 1]}
etcd3:
  hosts: $(IFS=,; echo "${hosts[*]}")
bootstrap:
  dcs:
    # Fast reactions for a loopback test: the loop every second; a leader whose Patroni stops
    # renewing its key loses it after 20 s (the smallest ttl Patroni accepts).
    ttl: 20
    loop_wait: 1
    retry_timeout: 5
    # Fail over at once when the primary's PostgreSQL crashes, rather than restart it.
    primary_start_timeout: 0
    # Commits wait for a synchronous standby, and only it may be promoted: no committed
    # write is lost by a failover.
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      parameters:
        fsync: 'off'
        max_connections: 300
  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
postgresql:
  listen: 127.0.0.1:${pg_ports[i - 1]}
  connect_address: 127.0.0.1:${pg_ports[i - 1]}
  data_dir: $dir/pg$i/data
  bin_dir: $bin
  pgpass: $dir/pg$i/pgpass
  use_unix_socket: false
  authentication:
    superuser:
      username: moat
    replication:
      username: replicator
    rewind:
      username: moat
  parameters:
    unix_socket_directories: '$dir/pg$i'
  # The replicas copy the primary now, not after its next spread checkpoint (a minute).
  basebackup:
    - checkpoint: fast
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication replicator 127.0.0.1/32 trust
YML
    launch "$dir/pg$i.log" "$dir/pg$i.pid" "$dir/pg$i" patroni "$dir/pg$i/patroni.yml"
  done
  what="primary (Patroni's REST API /primary)" wait_for 120 has_primary
  local leader
  for i in $(seq 1 "$members"); do
    if [ "$(api "${api_ports[i - 1]}" /primary)" = 200 ]; then leader=$i; fi
  done
  as "$dir" "$bin/psql" -h 127.0.0.1 -p "${pg_ports[leader - 1]}" -U moat -d postgres \
    -qAtc "SELECT 1 FROM pg_database WHERE datname = 'moat'" | grep -q 1 ||
    as "$dir" "$bin/createdb" -h 127.0.0.1 -p "${pg_ports[leader - 1]}" -U moat moat
  what="synchronous standby and running replicas (REST API /sync, /replica)" wait_for 180 settled
  trap - EXIT
  url
}

status() {
  local i pid
  for i in $(seq 1 ${#api_ports[@]}); do
    pid=$(postmaster_pid "$i" || echo -)
    echo "pg$i $(role "${api_ports[i - 1]}") http://127.0.0.1:${api_ports[i - 1]} ${pg_ports[i - 1]} $pid"
  done
}

# Kills the session recorded in pidfile $1: the program and all it forked.
end_session() {
  local pid
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  if alive "$pid"; then
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

# Immediate: the cluster holds throwaway data, and gracefully a Patroni spends seconds asking
# its stopping peers whether one should take over, an etcd member handing over its leadership.
stop() {
  local i pid pids=()
  for i in $(seq 1 ${#api_ports[@]}); do end_session "$dir/pg$i.pid"; done
  # The postmasters run in sessions of their own (Patroni starts them detached): an immediate
  # shutdown (SIGQUIT) ends each with its backends.
  for i in $(seq 1 ${#api_ports[@]}); do
    if pid=$(postmaster_pid "$i"); then
      kill -QUIT "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  local deadline=$((SECONDS + 10))
  for pid in "${pids[@]}"; do
    while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  for i in 1 2 3; do end_session "$dir/etcd$i.pid"; done
}

case $cmd in
  start) start "${3:-3}" ;;
  url) load && url ;;
  status) load && status ;;
  stop) load && stop ;;
  *) usage ;;
esac
