#!/usr/bin/env bash
# Install kflashd on a Klipper host, or remove it again. See docs/install.md.
#
#   sudo ./install.sh                 install (or update) and start kflashd
#   sudo ./install.sh --uninstall     stop it and remove every file the install put down
#   DESTDIR=/tmp/root ./install.sh    install into a scratch root only (CI, packaging):
#                                     no systemctl, udevadm, groupadd, usermod or chown
#
# Options:
#   --user USER      run the service as USER (default: the Klipper unit's User=, else the
#                    owner of ~/klipper of the user who ran sudo, else root)
#   --root           run the service as root (same as --user root)
#   --polkit KIND    auto (default), rules (polkit >= 0.106), pkla (older polkit), none
#   --editable       run the code from this checkout (for Moonraker updates; keep the clone)
#   --offline        no downloads: the venv sees Debian's python3-serial, python3-pyudev,
#                    python3-setuptools and python3-wheel (install them first); only
#                    kflashd itself is installed into it
#   --no-start       install and enable, but do not (re)start the service now
#   --uninstall      remove kflashd; with --keep-config /etc/kflashd/kflashd.toml stays
#
# The install is idempotent: running it again updates the package and the units, and never
# touches an existing /etc/kflashd/kflashd.toml.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
PREFIX=/opt/kflashd
VENV=$PREFIX/venv
GROUP=kflash
UNIT=/etc/systemd/system/kflashd.service
UDEV_RULE=/etc/udev/rules.d/70-kflashd.rules
POLKIT_RULES=/etc/polkit-1/rules.d/50-kflashd.rules
POLKIT_PKLA=/etc/polkit-1/localauthority/50-local.d/50-kflashd.pkla
CONFIG=/etc/kflashd/kflashd.toml
CATALOG=/usr/lib/systemd/catalog/kflashd.catalog
BIN_LINKS=(/usr/local/bin/kflashd /usr/local/bin/kflashctl)
UNIT_DIRS=(/etc/systemd/system /run/systemd/system /lib/systemd/system /usr/lib/systemd/system)
# Root mode's capabilities (docs/install.md says why each; tests/e2e/test_guard_instances.py
# runs the daemon with exactly these). CAP_DAC_OVERRIDE: Klipper's API socket is the
# Klipper user's, mode 0755, and connect() needs write permission on it; without it the
# print guard and the post-flash version proof cannot reach Klipper at all.
ROOT_CAPS="CAP_SETUID CAP_SETGID CAP_DAC_READ_SEARCH CAP_DAC_OVERRIDE CAP_CHOWN CAP_KILL"

ARGS=("$@")
action=install
user=""
polkit=auto
editable=no
offline=no
start=yes
keep_config=no

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while (($#)); do
    case $1 in
        --user) [[ $# -ge 2 ]] || die "--user needs a user name"; user=$2; shift ;;
        --user=*) user=${1#*=} ;;
        --root) user=root ;;
        --polkit) [[ $# -ge 2 ]] || die "--polkit needs auto, rules, pkla or none"; polkit=$2; shift ;;
        --polkit=*) polkit=${1#*=} ;;
        --editable) editable=yes ;;
        --offline) offline=yes ;;
        --no-start) start=no ;;
        --uninstall) action=uninstall ;;
        --keep-config) keep_config=yes ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done
case $polkit in auto|rules|pkla|none) ;; *) die "--polkit must be auto, rules, pkla or none, not '$polkit'" ;; esac

if [[ -z $DESTDIR && $(id -u) -ne 0 ]]; then
    die "must run as root: sudo $0 ${ARGS[*]}  (or set DESTDIR=/some/dir to install into a scratch root)"
fi
if [[ -n $DESTDIR && $DESTDIR != /* ]]; then
    die "DESTDIR must be an absolute path, not '$DESTDIR'"
fi

# System changes (services, udev, users) happen only for a real install on a host whose
# PID 1 is systemd; a DESTDIR install writes files and nothing else.
real() { [[ -z $DESTDIR ]]; }
have_systemd() { real && [[ -d /run/systemd/system ]]; }
run() { say "run: $*"; "$@"; }

# One temporary directory for rendered files and the build copy, removed however the
# script ends.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# "USER UNIT" from Klipper's unit file: klipper.service, else the first of KIAUH's
# multi-instance units klipper-NAME.service (klipper-1, klipper-2, ...; all run as the
# same user). USER is empty when that unit has no User=; nothing when no unit exists.
klipper_unit_user() {
    local dir f u units=()
    for dir in "${UNIT_DIRS[@]}"; do
        if [[ -f $dir/klipper.service ]]; then units+=("$dir/klipper.service"); fi
    done
    if ((${#units[@]} == 0)); then
        for dir in "${UNIT_DIRS[@]}"; do
            for f in "$dir"/klipper-*.service; do
                if [[ -f $f ]]; then units+=("$f"); fi
            done
        done
    fi
    if ((${#units[@]} == 0)); then return 0; fi
    f=${units[0]}
    u=$(sed -n 's/^[[:space:]]*User[[:space:]]*=[[:space:]]*\([^[:space:]]*\).*/\1/p' "$f" | tail -n 1)
    printf '%s %s\n' "$u" "${f##*/}"
}

# Sets $user: the Klipper unit's User=, else the owner of the sudo user's ~/klipper, else root.
detect_user() {
    local home
    local found
    found=$(klipper_unit_user)
    user=${found%% *}
    if [[ -n $user ]]; then
        say "Klipper user: $user (User= of ${found#* })"
        return
    fi
    if [[ -n ${SUDO_USER:-} && $SUDO_USER != root ]]; then
        home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
        if [[ -n $home && -d $home/klipper ]]; then
            user=$(stat -c %U "$home/klipper")
            say "Klipper user: $user (owner of $home/klipper)"
            return
        fi
    fi
    user=root
    say "no Klipper user found (no klipper.service with User=, no ~/klipper): running as root"
}

# "rules" for polkit >= 0.106 (JavaScript rules), "pkla" for older, "none" without polkit.
detect_polkit() {
    local version major minor
    if ! command -v pkaction >/dev/null 2>&1; then
        printf 'none\n'; return
    fi
    version=$(pkaction --version 2>/dev/null | sed -n 's/.*version[[:space:]]*\([0-9][0-9.]*\).*/\1/p')
    major=${version%%.*}
    minor=${version#*.}; minor=${minor%%.*}
    [[ $version == *.* ]] || minor=0
    if [[ -z $major ]]; then
        printf 'rules\n'
    elif ((major > 0 || minor >= 106)); then
        printf 'rules\n'
    else
        printf 'pkla\n'
    fi
}

# install -D with a message; mode as given.
put() {
    local mode=$1 from=$2 to=$3
    say "install $to"
    install -D -m "$mode" "$from" "$DESTDIR$to"
}

make_venv() {
    local python=${PYTHON:-}
    if [[ -z $python ]]; then
        if [[ -x /usr/bin/python3 ]]; then python=/usr/bin/python3; else python=python3; fi
    fi
    local venv_args=()
    [[ $offline == yes ]] && venv_args+=(--system-site-packages)
    # An --offline update of a venv made online: it cannot see Debian's packages; make it again.
    if [[ $offline == yes && -f $DESTDIR$VENV/pyvenv.cfg ]] &&
        ! grep -qiE '^include-system-site-packages *= *true' "$DESTDIR$VENV/pyvenv.cfg"; then
        say "$VENV does not see Debian's python3 packages (made without --offline): making it again"
        rm -rf "$DESTDIR$VENV"
    fi
    if [[ ! -x $DESTDIR$VENV/bin/python ]] || ! "$DESTDIR$VENV/bin/python" -c '' 2>/dev/null; then
        rm -rf "$DESTDIR$VENV"
        run "$python" -m venv "${venv_args[@]}" "$DESTDIR$VENV"
    fi
    local pip_args=(--disable-pip-version-check --no-cache-dir -q)
    if [[ $offline == yes ]]; then
        pip_args+=(--no-deps --no-index --no-build-isolation)
        # Without PyPI the build backend comes from Debian too (setuptools < 70 needs wheel).
        "$DESTDIR$VENV/bin/python" -c 'import setuptools, wheel' 2>/dev/null ||
            die "--offline builds with Debian's setuptools and wheel: apt-get install python3-setuptools python3-wheel"
    fi
    if [[ $editable == yes ]]; then
        run "$DESTDIR$VENV/bin/python" -m pip install "${pip_args[@]}" --force-reinstall -e "$SRC"
        check_dependencies
        return
    fi
    # Build from a copy: pip builds in the source tree, and root-owned build/ and
    # *.egg-info in the user's clone would get in the way of git (and of Moonraker).
    local tmp=$WORK/src
    rm -rf "$tmp"
    mkdir "$tmp"
    cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/kflashd" "$tmp/"
    find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
    rm -rf "$tmp"/*.egg-info
    run "$DESTDIR$VENV/bin/python" -m pip install "${pip_args[@]}" --force-reinstall "$tmp"
    check_dependencies
}

# --offline takes the dependencies from Debian: say which package is missing, if any.
check_dependencies() {
    local module missing=()
    for module in serial:python3-serial pyudev:python3-pyudev; do
        "$DESTDIR$VENV/bin/python" -c "import ${module%%:*}" 2>/dev/null || missing+=("${module#*:}")
    done
    if ((${#missing[@]})); then
        say "warning: the venv lacks ${missing[*]}: apt-get install ${missing[*]}"
        say "warning: and run this again, or run it without --offline"
    fi
}

# Facts from the config as the daemon will read it (with its discovery of the Klipper
# user's home): "unit NAME.service" for each of [klipper] services, and "dir PATH" for
# [klipper] dir unless that is only the built-in default.
config_facts() {
    "$DESTDIR$VENV/bin/python" - "$DESTDIR$CONFIG" <<'EOF'
import sys
from kflashd.config import load_config
config = load_config(sys.argv[1])
for name in config.klipper_services:
    print("unit", name if "." in name else name + ".service")
if config.sources.get("klipper.dir", "default") != "default":
    print("dir", config.klipper_dir)
EOF
}

render_unit() {
    local svc_user=$1 svc_group=$2 klipper_dir=$3
    # make flash writes out/ and builds its flash helper (lib/hidflash, lib/rp2040_flash).
    local tree_out="-$klipper_dir/out -$klipper_dir/lib/hidflash -$klipper_dir/lib/rp2040_flash"
    if [[ $svc_user == root ]]; then
        # Root mode: make runs as the tree's owner (setuid), the 0700 home is read with
        # CAP_DAC_READ_SEARCH, Klipper's socket is reached with CAP_DAC_OVERRIDE, the flash
        # tool of another user is stopped with CAP_KILL.
        sed -e "s|^User=.*|User=root|" \
            -e "s|^Group=.*|Group=root|" \
            -e "s|^ReadWritePaths=.*|ReadWritePaths=$tree_out|" \
            -e "s|^CapabilityBoundingSet=.*|CapabilityBoundingSet=$ROOT_CAPS\nSystemCallFilter=@setuid|" \
            "$SRC/systemd/kflashd.service"
    else
        sed -e "s|^User=.*|User=$svc_user|" \
            -e "s|^Group=.*|Group=$svc_group|" \
            -e "s|^ReadWritePaths=.*|ReadWritePaths=$tree_out|" \
            "$SRC/systemd/kflashd.service"
    fi
}

render_polkit_rules() {
    local svc_user=$1; shift
    local units="" u
    for u in "$@"; do units+="${units:+, }\"$u\""; done
    sed -e "s|@USER@|$svc_user|g" -e "s|@UNITS@|$units|g" "$SRC/packaging/kflashd-polkit.rules.in"
}

render_polkit_pkla() {
    sed -e "s|@USER@|$1|g" "$SRC/packaging/kflashd-polkit.pkla.in"
}

do_install() {
    [[ -n $user ]] || detect_user
    local svc_group home
    if [[ $user == root ]]; then
        svc_group=root
        home=$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)
        [[ -n $home && $home != /root ]] || home=/home/pi
    else
        if getent passwd "$user" >/dev/null; then
            svc_group=$(id -gn "$user")
            home=$(getent passwd "$user" | cut -d: -f6)
        elif real; then
            die "user '$user' does not exist"
        else
            svc_group=$user; home=/home/$user   # scratch root: the user need not exist here
        fi
    fi
    [[ $polkit == auto ]] && polkit=$(detect_polkit)
    if [[ $user != root && $polkit == none ]]; then
        say "warning: polkit is not installed, so $user cannot start/stop Klipper by itself."
        say "warning: install polkit (apt-get install polkitd) and run this again, or use --root,"
        say "warning: or see docs/install.md for the passwordless-sudo fallback."
    fi
    say "installing kflashd from $SRC${DESTDIR:+ into $DESTDIR} (service user: $user)"

    make_venv
    local link
    for link in "${BIN_LINKS[@]}"; do
        say "link $link -> $VENV/bin/${link##*/}"
        mkdir -p "$DESTDIR${link%/*}"
        ln -sfn "$VENV/bin/${link##*/}" "$DESTDIR$link"
    done

    if [[ -e $DESTDIR$CONFIG ]]; then
        say "keep $CONFIG (exists; packaging/kflashd.toml.example shows every key)"
    else
        put 0644 "$SRC/packaging/kflashd.toml.example" "$CONFIG"
    fi

    local facts u units=() klipper_dir=$home/klipper
    facts=$(config_facts) || die "cannot read $CONFIG (fix it, then run this again)"
    units=($(sed -n 's/^unit //p' <<<"$facts"))
    for u in "${units[@]}"; do
        [[ $u =~ ^[A-Za-z0-9:_.@-]+$ ]] || die "[klipper] services: '$u' is not a unit name"
    done
    if grep -q '^dir ' <<<"$facts"; then klipper_dir=$(sed -n 's/^dir //p' <<<"$facts"); fi
    say "Klipper units: ${units[*]}; Klipper tree: $klipper_dir"

    local rendered=$WORK/rendered
    render_unit "$user" "$svc_group" "$klipper_dir" >"$rendered"
    put 0644 "$rendered" "$UNIT"
    put 0644 "$SRC/udev/70-kflashd.rules" "$UDEV_RULE"
    if [[ -f $SRC/kflashd/catalog/kflashd.catalog ]]; then
        put 0644 "$SRC/kflashd/catalog/kflashd.catalog" "$CATALOG"
    else
        say "warning: $SRC/kflashd/catalog/kflashd.catalog is missing: no journal catalog"
    fi

    # Exactly one polkit file, for the service user and the configured Klipper units.
    rm -f "$DESTDIR$POLKIT_RULES" "$DESTDIR$POLKIT_PKLA"
    if [[ $user != root ]]; then
        case $polkit in
            rules)
                render_polkit_rules "$user" "${units[@]}" >"$rendered"
                put 0644 "$rendered" "$POLKIT_RULES"
                say "polkit: $user may start/stop/restart ${units[*]}" ;;
            pkla)
                render_polkit_pkla "$user" >"$rendered"
                put 0644 "$rendered" "$POLKIT_PKLA"
                say "polkit (< 0.106, .pkla): $user may manage systemd units" ;;
        esac
    fi

    if ! real; then
        say "DESTDIR install done: no users, groups or services were changed"
        return
    fi
    getent group "$GROUP" >/dev/null || run groupadd --system "$GROUP"
    if [[ $user != root ]]; then
        id -nG "$user" | tr ' ' '\n' | grep -qx "$GROUP" || run usermod -aG "$GROUP" "$user"
    fi
    if [[ -n ${SUDO_USER:-} && $SUDO_USER != root && $SUDO_USER != "$user" ]]; then
        id -nG "$SUDO_USER" | tr ' ' '\n' | grep -qx "$GROUP" || run usermod -aG "$GROUP" "$SUDO_USER"
    fi
    if command -v journalctl >/dev/null; then run journalctl --update-catalog; fi
    if command -v udevadm >/dev/null && [[ -S /run/udev/control ]]; then
        run udevadm control --reload
    else
        say "udev is not running: the rule takes effect when it starts"
    fi
    if ! have_systemd; then
        say "systemd is not running (container?): enable and start kflashd yourself"
        return
    fi
    run systemctl daemon-reload
    run systemctl enable kflashd.service
    if [[ $start == yes ]]; then
        run systemctl restart kflashd.service
        say "done: kflashctl status; journalctl -u kflashd"
    else
        say "done (not started: --no-start)"
    fi
}

# Remove a directory if it is empty, then its parents up to (not including) $stop.
prune_up() {
    local dir=$1 stop=$2
    while [[ $dir != "$stop" && $dir == "$stop"/* && -d $dir ]]; do
        rmdir "$dir" 2>/dev/null || return 0
        dir=${dir%/*}
    done
}

do_uninstall() {
    if have_systemd; then
        systemctl disable --now kflashd.service 2>/dev/null || true
        say "stopped and disabled kflashd.service"
    fi
    local f files=("$UNIT" "$UDEV_RULE" "$POLKIT_RULES" "$POLKIT_PKLA" "$CATALOG" "${BIN_LINKS[@]}")
    [[ $keep_config == yes ]] || files+=("$CONFIG")
    for f in "${files[@]}"; do
        if [[ -e $DESTDIR$f || -L $DESTDIR$f ]]; then
            say "remove $f"
            rm -f "$DESTDIR$f"
        fi
    done
    local d dirs=("$PREFIX" /var/lib/kflashd /run/kflashd)
    for d in "${dirs[@]}"; do
        if [[ -e $DESTDIR$d ]]; then
            say "remove $d/"
            rm -rf -- "$DESTDIR$d"
        fi
    done
    # Our own directories go; the OS's (/etc/udev/rules.d, /usr/local/bin, ...) stay,
    # except in a scratch root, which must end up empty.
    if [[ $keep_config == no ]]; then rmdir "$DESTDIR/etc/kflashd" 2>/dev/null || true; fi
    if ! real; then
        for f in "${files[@]}" "${dirs[@]}"; do prune_up "$DESTDIR${f%/*}" "$DESTDIR"; done
        say "DESTDIR uninstall done"
        return
    fi
    if command -v journalctl >/dev/null; then run journalctl --update-catalog; fi
    if command -v udevadm >/dev/null && [[ -S /run/udev/control ]]; then run udevadm control --reload; fi
    if have_systemd; then run systemctl daemon-reload; fi
    if getent group "$GROUP" >/dev/null; then run groupdel "$GROUP"; fi
    say "kflashd removed"
}

if [[ $action == install ]]; then do_install; else do_uninstall; fi
