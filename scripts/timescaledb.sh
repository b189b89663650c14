#!/usr/bin/env bash
# Build + install TimescaleDB (when missing) and run a SEPARATE PostgreSQL 15 cluster
# with it preloaded, leaving the default cluster (5432) untouched. Idempotent: when the
# extension is installed and the cluster is up, it only prints the DSN (well under 1 s).
#
#   scripts/timescaledb.sh            -> prints e.g. postgresql://postgres@127.0.0.1:5433/test
#
# Overrides: TIMESCALEDB_TARBALL (default ../shared/vendor/timescaledb-2.28.3.tar.gz next to
# the repo), TSDB_PG_VERSION (15), TSDB_CLUSTER (tsdb), TSDB_PORT (5433),
# TSDB_BUILD_DIR (/tmp/timescaledb-build). Needs root (apt-get, make install, pg_createcluster).
# Every message except the DSN goes to stderr, so `DSN=$(scripts/timescaledb.sh)` works.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
version=2.28.3
pgv="${TSDB_PG_VERSION:-15}"
cluster="${TSDB_CLUSTER:-tsdb}"
port="${TSDB_PORT:-5433}"
tarball="${TIMESCALEDB_TARBALL:-$repo/../shared/vendor/timescaledb-$version.tar.gz}"
build_dir="${TSDB_BUILD_DIR:-/tmp/timescaledb-build}"
log() { echo "timescaledb: $*" >&2; }
export DEBIAN_FRONTEND=noninteractive

pkglibdir="/usr/lib/postgresql/$pgv/lib"
stamp="$pkglibdir/timescaledb-$version.pymigrate-build"  # our (patched) build is installed
built=0
if [ ! -f "$pkglibdir/timescaledb-$version.so" ] || [ ! -f "$stamp" ]; then
  [ -f "$tarball" ] || { log "tarball not found: $tarball (set TIMESCALEDB_TARBALL)"; exit 1; }
  need=()
  for pkg in "postgresql-server-dev-$pgv" cmake gcc make libssl-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -q >&2
    apt-get install -y -q "${need[@]}" >&2
  fi
  log "building $version from $tarball (about 2 min)"
  rm -rf "$build_dir" && mkdir -p "$build_dir"
  tar -xzf "$tarball" -C "$build_dir" --strip-components=1
  # PostgreSQL 15.20 refuses to drop the portal TimescaleDB's job runner creates and never
  # runs ("cannot drop portal "" while it is being set up"), so every background job
  # (compression, retention and continuous-aggregate policies) fails; mark it done first.
  job_c="$build_dir/tsl/src/bgw_policy/job.c"
  sed -i 's/^\([[:space:]]*\)PortalDrop(portal, false);/\1portal->status = PORTAL_DONE;\n\1PortalDrop(portal, false);/' "$job_c"
  grep -q 'portal->status = PORTAL_DONE;' "$job_c" || { log "patch of $job_c did not apply"; exit 1; }
  (
    cd "$build_dir"
    ./bootstrap -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
      -DPG_CONFIG="/usr/lib/postgresql/$pgv/bin/pg_config" -DCMAKE_BUILD_TYPE=Release >&2
    make -C build -j2 install >&2
  )
  rm -rf "$build_dir"
  touch "$stamp"
  built=1
fi

conf="/etc/postgresql/$pgv/$cluster"
if [ ! -d "$conf" ]; then
  log "creating cluster $pgv/$cluster on port $port"
  pg_createcluster "$pgv" "$cluster" -p "$port" >&2
  cat >>"$conf/postgresql.conf" <<CONF
# added by scripts/timescaledb.sh
shared_preload_libraries = 'timescaledb'
listen_addresses = '127.0.0.1'
timescaledb.telemetry_level = off
max_connections = 200
CONF
  cat >"$conf/pg_hba.conf" <<HBA
local   all all                 trust
host    all all 127.0.0.1/32    trust
host    all all ::1/128         trust
HBA
fi
if ! pg_lsclusters -h "$pgv" "$cluster" 2>/dev/null | awk '{print $4}' | grep -q online; then
  pg_ctlcluster --skip-systemctl-redirect "$pgv" "$cluster" start >&2
elif [ "$built" = 1 ]; then  # a new build: load it
  pg_ctlcluster --skip-systemctl-redirect "$pgv" "$cluster" restart >&2
fi
for _ in $(seq 1 30); do
  pg_isready -q -h 127.0.0.1 -p "$port" -U postgres -d postgres && break
  sleep 0.5
done
psql_() { psql -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_ -d postgres -c "SELECT 1 FROM pg_database WHERE datname = 'test'")" != 1 ]; then
  psql_ -d postgres -c "CREATE DATABASE test" >&2
fi
psql_ -d test -c "CREATE EXTENSION IF NOT EXISTS timescaledb" >/dev/null 2>&1 || true
echo "postgresql://postgres@127.0.0.1:$port/test"
