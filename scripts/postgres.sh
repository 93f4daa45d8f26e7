#!/usr/bin/env bash
# A throwaway PostgreSQL for tests: a new cluster in DIR owned by an unprivileged user
# (initdb refuses root), listening only on a unix socket in DIR, with durability off (it holds
# test data). No system service, no TCP port.
#
#   scripts/postgres.sh start DIR     create and start it; prints its URL for moat serve --store
#   scripts/postgres.sh restart DIR   stop it (fast: sessions are ended) and start it again
#   scripts/postgres.sh stop DIR      stop it (DIR stays; remove it yourself)
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|restart|stop DIR" >&2
  exit 2
fi
# Debian keeps the server's programs off PATH, under the version's directory.
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  echo "PostgreSQL's initdb is missing: run scripts/install-deps.sh (Debian package postgresql)" >&2
  exit 1
fi
# As root, the cluster belongs to nobody; otherwise to whoever runs this.
as() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u nobody -- "$@"
  else
    "$@"
  fi
}
ctl() {
  as "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 "$@"
}

case $cmd in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown nobody: "$dir"
    if [ ! -d "$dir/data" ]; then
      as "$bin/initdb" -D "$dir/data" -U moat --auth=trust --no-sync -E UTF8 >"$dir/initdb.log"
      cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
CONF
    fi
    ctl start >/dev/null
    as "$bin/psql" -h "$dir" -U moat -d postgres -qAtc "SELECT 1 FROM pg_database WHERE datname = 'moat'" | grep -q 1 ||
      as "$bin/createdb" -h "$dir" -U moat moat
    echo "postgres://moat@localhost/moat?host=$dir"
    ;;
  restart) ctl -m fast restart >/dev/null ;;
  stop) ctl -m fast stop >/dev/null ;;
  *)
    echo "usage: $0 start|restart|stop DIR" >&2
    exit 2
    ;;
esac
