# Shared by scripts/test and scripts/demo: install what is missing, or say what to install.

say() { printf '%s\n' "$*" >&2; }

ensure_uv() {
    if command -v uv >/dev/null 2>&1; then return; fi
    say "uv not found: installing it with pip (python3 -m pip install --user uv)"
    if ! python3 -m pip install --quiet uv 2>/dev/null && ! python3 -m pip install --quiet --user uv; then
        say "error: could not install uv. Install it (https://docs.astral.sh/uv/) and run this again."
        exit 2
    fi
    export PATH="$HOME/.local/bin:$PATH"
    command -v uv >/dev/null 2>&1 || { say "error: uv installed but not on PATH"; exit 2; }
}

# ensure_debian_packages CMD[:PACKAGE] ...: install the Debian package for each missing command.
ensure_debian_packages() {
    local missing=() spec cmd pkg
    for spec in "$@"; do
        cmd=${spec%%:*}; pkg=${spec#*:}
        if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then missing+=("$pkg"); fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian packages: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
            { say "error: apt-get could not install ${missing[*]}; install them and run this again."; exit 2; }
    elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "error: missing ${missing[*]}. Install with: sudo apt-get install ${missing[*]}"
        exit 2
    fi
}

# ensure_postgres: a PostgreSQL cluster for the hub's PostgreSQL tests (tests/support/pg.py).
# With EDGE_TEST_PG_DSN set, that server is used as it is. Otherwise: install the Debian
# package where it is missing (as root, or sudo), start every installed cluster that is
# down (pg_ctlcluster; the postmaster does not run as root, the tool switches user), and
# say what to do when 127.0.0.1:5432 still does not take user postgres.
ensure_postgres() {
    [ -n "${EDGE_TEST_PG_DSN:-}" ] && return 0
    if ! command -v pg_lsclusters >/dev/null 2>&1; then
        ensure_debian_packages pg_lsclusters:postgresql
    fi
    local ver name status
    while read -r ver name _ status _; do
        [ "$status" = down ] || continue
        say "starting PostgreSQL cluster $ver/$name"
        if [ "$(id -u)" = 0 ]; then
            pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start || say "warning: could not start $ver/$name"
        else
            sudo -n pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start 2>/dev/null ||
                say "warning: could not start PostgreSQL $ver/$name (run: sudo pg_ctlcluster $ver $name start)"
        fi
    done < <(pg_lsclusters --no-header 2>/dev/null)
    if command -v psql >/dev/null 2>&1 &&
        ! psql -h 127.0.0.1 -U postgres -d postgres -w -Atqc 'SELECT 1' >/dev/null 2>&1; then
        say "warning: PostgreSQL on 127.0.0.1:5432 does not take user postgres without a password: allow it"
        say "  (pg_hba.conf: host all postgres 127.0.0.1/32 trust) or set EDGE_TEST_PG_DSN=postgresql://USER:PASS@HOST/postgres"
        say "  (the PostgreSQL tests are skipped, or fail with CI=true)"
    fi
}
