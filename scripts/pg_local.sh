#!/usr/bin/env bash
# A throwaway local PostgreSQL for development and tests: one cluster in a folder of your choice, listening
# on 127.0.0.1 only, trust authentication for local connections only, nothing installed as a service.
#
#   scripts/pg_local.sh install            # apt-get install postgresql, only if no initdb is found (quiet, idempotent)
#   scripts/pg_local.sh start DIR [PORT]   # initdb (first time), start (port 5433 by default), create the
#                                          # databases matrix, dagster and mlflow; prints the URL of `matrix`
#   scripts/pg_local.sh stop DIR           # stop the cluster (rm -rf DIR afterwards to throw it away)
#
# Run as root (CI), the server runs as the `postgres` user and DIR is chowned to it, so DIR's parent folders
# must be traversable by `postgres` (e.g. under /tmp). Run as another user, it runs as that user.
# The cluster trades durability for speed (fsync=off): never keep data you care about in it.
set -euo pipefail

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

pg_bin() {
  # The newest Debian-packaged server, or initdb on PATH (other distributions, macOS); PG_BIN overrides.
  if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then echo "$PG_BIN"; return 0; fi
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | while read -r d; do
    [ -x "$d/initdb" ] && echo "$d"; done | tail -n 1)
  if [ -n "$found" ]; then echo "$found"; return 0; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
  return 1
}

as_server_user() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cmd_install() {
  if pg_bin >/dev/null; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    echo "PostgreSQL is not installed; run as root: $0 install" >&2
    exit 1
  fi
  # Only the binaries are wanted: no system cluster on port 5432.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/50-matrix-no-main-cluster.conf
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  pg_bin >/dev/null || { echo "postgresql installed but no initdb found" >&2; exit 1; }
}

cmd_start() {
  [ $# -ge 1 ] || usage
  local dir port bin
  dir=$(realpath -m "$1")
  port=${2:-5433}
  bin=$(pg_bin) || { echo "PostgreSQL not installed: run $0 install" >&2; exit 1; }
  mkdir -p "$dir/sock"
  if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$dir"; fi
  if [ ! -s "$dir/data/PG_VERSION" ]; then
    as_server_user "$bin/initdb" -D "$dir/data" -U postgres -E UTF8 --locale=C.UTF-8 --auth=trust --no-sync \
      >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    # Trust only the Unix socket and 127.0.0.1; no other host, no IPv6, no replication.
    printf '%s\n' "local all all trust" "host all all 127.0.0.1/32 trust" | as_server_user tee "$dir/data/pg_hba.conf" >/dev/null
  fi
  if ! as_server_user "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-p $port -k $dir/sock -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
      start >/dev/null || { tail -n 20 "$dir/server.log" >&2; exit 1; }
    echo "$port" | as_server_user tee "$dir/port" >/dev/null
  fi
  port=$(cat "$dir/port")
  local psql=("$bin/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1)
  local db
  for db in matrix dagster mlflow; do  # the store, Dagster's storage, MLflow's backend: one database each
    if [ -z "$("${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
      "${psql[@]}" -c "CREATE DATABASE $db"
    fi
  done
  echo "postgresql+psycopg2://postgres@127.0.0.1:$port/matrix"
}

cmd_stop() {
  [ $# -eq 1 ] || usage
  local dir bin
  dir=$(realpath -m "$1")
  bin=$(pg_bin) || { echo "PostgreSQL not installed" >&2; exit 1; }
  [ -s "$dir/data/PG_VERSION" ] || { echo "no cluster in $dir" >&2; exit 1; }
  if as_server_user "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    as_server_user "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
  fi
}

[ $# -ge 1 ] || usage
sub=$1
shift
case "$sub" in
  install) cmd_install "$@" ;;
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  *) usage ;;
esac
