#!/usr/bin/env bash
# A throwaway PostgreSQL (Debian's postgresql package) on a free loopback port for the tests: a fresh
# cluster made with initdb in DIR, no system service, trust auth for 127.0.0.1 only, fsync off (test
# data: a crashed server still keeps every commit, an OS crash might not; synchronous_commit stays on,
# since the crash test counts on a commit being durable when it returns).
#
#   scripts/postgres.sh start DIR   initdb + start in DIR (created), wait until it answers, print the URL
#   scripts/postgres.sh stop DIR    stop the server started in DIR (its postmaster pid) and remove DIR
#   scripts/postgres.sh restart DIR stop at once (-m immediate, a crash) and start again on the same data
#                                   and port (the crash test)
#   scripts/postgres.sh down DIR [fast|immediate]  stop the server only: fast (default) is a clean
#                                   shutdown, immediate a crash; `up DIR` starts it again (the chaos tests)
#
# initdb refuses to run as root: as root, the server runs as the `postgres` user the package creates.
set -euo pipefail

cmd=${1:?usage: postgres.sh start|stop|restart|down|up DIR}
dir=${2:?usage: postgres.sh start|stop|restart|down|up DIR}
bin=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || { echo "no PostgreSQL server under /usr/lib/postgresql (apt-get install postgresql)" >&2; exit 1; }
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_server() {
  local port
  port=$(cat "$dir/port")
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off" \
    start >/dev/null
}

case "$cmd" in
start)
  mkdir -p "$dir"
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres "$dir"
    runuser -u postgres -- test -w "$dir" ||
      { echo "user postgres cannot reach $dir: make its parent directories traversable (chmod o+x)" >&2; exit 1; }
  fi
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' >"$dir/port"
  as_owner "$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
    { cat "$dir/initdb.log" >&2; exit 1; }
  start_server
  echo "postgres://postgres@127.0.0.1:$(cat "$dir/port")/postgres"
  ;;
stop)
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null || true
  fi
  rm -rf "$dir"
  ;;
restart)
  as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t 60 stop >/dev/null
  start_server
  ;;
down)
  mode=${3:-fast}
  case $mode in fast | immediate) ;; *) echo "down: mode is fast or immediate" >&2; exit 2 ;; esac
  as_owner "$bin/pg_ctl" -D "$dir/data" -m "$mode" -w -t 60 stop >/dev/null
  ;;
up)
  start_server
  ;;
*)
  echo "usage: postgres.sh start|stop|restart|down|up DIR" >&2
  exit 2
  ;;
esac
