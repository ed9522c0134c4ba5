#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests (CI and local runs).
#   scripts/pg_test_cluster.sh start DIR   initdb + start in DIR; prints the URL to use as MYNAH_TEST_PG_URL
#   scripts/pg_test_cluster.sh stop DIR    stop it (the folder can then be deleted)
# initdb refuses to run as root, so as root the cluster runs as the `postgres` system user
# (created when missing). It listens on 127.0.0.1 on a free port, trusts local connections
# (a test cluster only: no password), and trades durability for speed (fsync off).
set -euo pipefail
cmd=${1:?usage: pg_test_cluster.sh start|stop DIR}
dir=${2:?usage: pg_test_cluster.sh start|stop DIR}
bindir=$(dirname "$(command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb | tail -1)")
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "$cmd" in
  start)
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
      useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
      chown postgres "$dir"
      chmod a+x "$(dirname "$(realpath "$dir")")"   # postgres must reach it (mktemp -d makes 0700 folders)
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bindir/initdb" -D "$dir/data" -U mynah -A trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
      -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
      >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    echo "postgresql://mynah@127.0.0.1:$port/postgres"
    ;;
  stop)
    [ -d "$dir/data" ] && as_owner "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null || true
    ;;
  *) echo "usage: pg_test_cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
