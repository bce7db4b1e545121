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
