#!/usr/bin/env bash
# Provision a pgward appliance on Debian 12: PostgreSQL 15, pgward from its Debian package and
# set up with `pgward install` (the same path as on any other host), a demo database and a demo
# OS user whose psql lands in pgward with a token.
#
# Vagrant runs it as root (see Vagrantfile). It can be run again: what is there is kept.
# tests/appliance.rs runs it in an isolated root (mount + network namespace) with these knobs:
#   PGWARD_PROVISION_SKIP_APT=1    do not run apt-get (the packages must already be there)
#   PGWARD_PROVISION_NO_SYSTEMD=1  no systemctl: `pgward install --no-systemctl`; the caller
#                                  starts Postgres, restarts it after install, and runs pgward
#   PGWARD_DEB=FILE                install this pgward .deb (default: PGWARD_SRC/target/debian's,
#                                  else one built there with `cargo xtask package`)
#   PGWARD_BIN=FILE                no package: `pgward install` copies this binary to
#                                  /usr/local/bin (how the isolated-root test runs it)
#   PGWARD_SRC=DIR                 pgward's source tree (default: the repository holding this file)
#   PGWARD_PG_USER=NAME            Postgres's OS user, also its superuser role (default postgres)
#   PGWARD_PG_CONF=FILE            its postgresql.conf (default /etc/postgresql/15/main/postgresql.conf)
#   PGWARD_INSTALL_ARGS="..."      more arguments for `pgward install` (split on spaces)
#   PGWARD_DEMO_USER=NAME          the demo OS user and token subject (default demo)
set -euo pipefail
cd /

PG_MAJOR=15
SRC=${PGWARD_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PG_USER=${PGWARD_PG_USER:-postgres}
PG_CONF=${PGWARD_PG_CONF:-/etc/postgresql/$PG_MAJOR/main/postgresql.conf}
DEMO_USER=${PGWARD_DEMO_USER:-demo}
DEMO_DB=demo
SVC_ROLE=pgward_svc
SVC_PASSWORD_FILE=/root/pgward-svc.password
CONFIG=/etc/pgward/pgward.toml
MANIFEST=/var/lib/pgward/install-manifest.json
REAL_SOCKET_DIR=/run/postgresql-real
SOCKET_DIR=/var/run/postgresql
NO_SYSTEMD=${PGWARD_PROVISION_NO_SYSTEMD:-0}

say() { printf '==> provision: %s\n' "$*"; }
die() { printf '==> provision: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run me as root"

# ---- 1. packages ---------------------------------------------------------------------------
if [ "${PGWARD_PROVISION_SKIP_APT:-0}" = 1 ]; then
  say "apt: skipped (PGWARD_PROVISION_SKIP_APT=1)"
else
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # e2fsprogs: chattr (append-only audit log); util-linux: setpriv; iproute2: ip.
  apt-get install -y -q --no-install-recommends \
    "postgresql-$PG_MAJOR" "postgresql-client-$PG_MAJOR" ca-certificates curl git \
    e2fsprogs util-linux iproute2
fi
for tool in psql setpriv useradd; do
  command -v "$tool" >/dev/null || die "$tool is missing (install postgresql-client-$PG_MAJOR, util-linux, passwd)"
done

# ---- 2. the pgward package -----------------------------------------------------------------
runs_here() { [ -x "$1" ] && "$1" --version >/dev/null 2>&1; }
build_package() {
  # The CI recipe: pinned toolchains, bpf-linker, LLVM 22 (Debian 12 security archive), then
  # `cargo xtask package`: the eBPF object, the release binary that embeds it, the .deb.
  # ~10 minutes on a fresh VM.
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! command -v rustup >/dev/null; then
    say "installing rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none
  fi
  say "building the pgward package from $SRC"
  (cd "$SRC" && bash .ci/run --install-only && cargo xtask package)
}
newest_deb() { ls -t "$SRC"/target/debian/pgward_*.deb 2>/dev/null | head -n 1; }
if [ -n "${PGWARD_BIN:-}" ]; then
  BIN=$PGWARD_BIN
  runs_here "$BIN" || die "PGWARD_BIN=$BIN does not run here"
  PGWARD=/usr/local/bin/pgward
else
  DEB=${PGWARD_DEB:-$(newest_deb)}
  if [ -z "$DEB" ]; then
    build_package
    DEB=$(newest_deb)
  fi
  [ -f "$DEB" ] || die "no pgward package (${PGWARD_DEB:-$SRC/target/debian/pgward_*.deb})"
  say "installing $DEB"
  if [ "${PGWARD_PROVISION_SKIP_APT:-0}" = 1 ]; then
    dpkg -i "$DEB"
  else
    apt-get install -y -q "$(realpath "$DEB")"
  fi
  BIN=/usr/bin/pgward
  PGWARD=$BIN
fi
say "pgward binary: $BIN ($("$BIN" --version))"

# ---- 3. PostgreSQL -------------------------------------------------------------------------
[ -f "$PG_CONF" ] || die "no $PG_CONF (is postgresql-$PG_MAJOR installed?)"
PG_PORT=$(sed -n 's/^[[:space:]]*port[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$PG_CONF" | tail -n 1)
PG_PORT=${PG_PORT:-5432}
if [ "$NO_SYSTEMD" != 1 ]; then
  systemctl enable --now postgresql
fi
# The superuser connects over the real socket: the default directory before install, the
# private one after (where the default path is pgward's).
pg_socket_dir() {
  local d
  for d in "$REAL_SOCKET_DIR" "$SOCKET_DIR"; do
    if [ -S "$d/.s.PGSQL.$PG_PORT" ]; then echo "$d"; return 0; fi
  done
  return 1
}
for _ in $(seq 1 60); do pg_socket_dir >/dev/null && break; sleep 0.5; done
PG_SOCKET=$(pg_socket_dir) || die "PostgreSQL is not running (no socket .s.PGSQL.$PG_PORT in $REAL_SOCKET_DIR or $SOCKET_DIR)"
as_pg() { setpriv --reuid="$PG_USER" --regid="$(id -g "$PG_USER")" --init-groups -- "$@"; }
psql_pg() { as_pg psql -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCKET" -p "$PG_PORT" "$@"; }
say "PostgreSQL: socket $PG_SOCKET, port $PG_PORT"

# ---- 4. pgward's service role and the demo database ----------------------------------------
if [ ! -s "$SVC_PASSWORD_FILE" ]; then
  (umask 077 && od -An -N18 -tx1 /dev/urandom | tr -d ' \n' > "$SVC_PASSWORD_FILE" && echo >> "$SVC_PASSWORD_FILE")
fi
SVC_PASSWORD=$(head -n 1 "$SVC_PASSWORD_FILE")
case "$SVC_PASSWORD" in
  "" | *[!A-Za-z0-9]*) die "$SVC_PASSWORD_FILE must hold a non-empty alphanumeric password" ;;
esac
# On stdin, not the command line (ps would show it).
psql_pg -d postgres <<SQL
SELECT 'CREATE ROLE $SVC_ROLE LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$SVC_ROLE') \\gexec
ALTER ROLE $SVC_ROLE LOGIN PASSWORD '$SVC_PASSWORD';
GRANT pg_signal_backend, pg_read_all_settings TO $SVC_ROLE;
SELECT 'CREATE DATABASE $DEMO_DB OWNER $SVC_ROLE' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DEMO_DB') \\gexec
SQL
psql_pg -d "$DEMO_DB" <<SQL
CREATE TABLE IF NOT EXISTS customers (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL, card text);
ALTER TABLE customers OWNER TO $SVC_ROLE;
INSERT INTO customers VALUES
  (1, 'Ada Lovelace', 'ada@example.com', '4242424242424242'),
  (2, 'Grace Hopper', 'grace@example.com', '5555555555554444'),
  (3, 'Edsger Dijkstra', 'edsger@example.com', NULL)
ON CONFLICT (id) DO NOTHING;
SQL
say "role $SVC_ROLE and database $DEMO_DB ready"

# ---- 5. the demo OS user -------------------------------------------------------------------
if ! id "$DEMO_USER" >/dev/null 2>&1; then
  useradd --create-home --shell /bin/bash --comment "pgward demo user" "$DEMO_USER"
fi

# ---- 6. pgward install ---------------------------------------------------------------------
if [ -e "$MANIFEST" ]; then
  say "pgward is already installed ($MANIFEST); \`pgward uninstall\` starts over"
else
  args=(--upstream-password-file "$SVC_PASSWORD_FILE" --service-role "$SVC_ROLE" --database "$DEMO_DB"
        --pg-user "$PG_USER" --pg-conf "$PG_CONF")
  if [ "$NO_SYSTEMD" = 1 ]; then args+=(--no-systemctl); fi
  read -r -a extra <<<"${PGWARD_INSTALL_ARGS:-}"
  "$BIN" install "${args[@]}" "${extra[@]}"
fi

# ---- 7. a token for the demo user ----------------------------------------------------------
DEMO_HOME=
while IFS=: read -r name _ _ _ _ home _; do
  if [ "$name" = "$DEMO_USER" ]; then DEMO_HOME=$home; fi
done < /etc/passwd
[ -d "$DEMO_HOME" ] || die "no home directory for $DEMO_USER"
TOKEN=$("$PGWARD" token issue --config "$CONFIG" --user "$DEMO_USER" --groups analysts --ttl 12h)
(umask 077 && printf '*:*:*:%s:%s\n' "$DEMO_USER" "$TOKEN" > "$DEMO_HOME/.pgpass.new")
chown "$DEMO_USER:$(id -gn "$DEMO_USER")" "$DEMO_HOME/.pgpass.new"
mv -f "$DEMO_HOME/.pgpass.new" "$DEMO_HOME/.pgpass"
if ! grep -q '^# pgward demo' "$DEMO_HOME/.profile" 2>/dev/null; then
  cat >> "$DEMO_HOME/.profile" <<EOF
# pgward demo: psql reaches PostgreSQL only through pgward (the default socket and TCP port
# 5432 are pgward's). ~/.pgpass holds a 12-hour token for $DEMO_USER; renew it as root with
#   pgward token issue --config $CONFIG --user $DEMO_USER --groups analysts --ttl 12h
export PGUSER=$DEMO_USER PGDATABASE=$DEMO_DB
EOF
  chown "$DEMO_USER:$(id -gn "$DEMO_USER")" "$DEMO_HOME/.profile"
fi
say "token for $DEMO_USER written to $DEMO_HOME/.pgpass (valid 12 h)"

# ---- 8. services ---------------------------------------------------------------------------
if [ "$NO_SYSTEMD" = 1 ]; then
  say "systemd skipped: restart PostgreSQL (its socket moves to $REAL_SOCKET_DIR) and run pgward serve --config $CONFIG"
else
  systemctl is-active --quiet pgward || systemctl restart pgward
  "$PGWARD" doctor --config "$CONFIG" || true
fi
say "done. Try: vagrant ssh -c \"sudo -iu $DEMO_USER psql -c 'select * from customers'\""
