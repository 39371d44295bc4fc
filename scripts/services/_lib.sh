# shellcheck shell=bash
# Shared helpers for scripts/services/<name>.  Sourced, never executed.
#
# Conventions used by every service script:
#   NAME install            idempotent install into $IMHUB_CACHE_DIR
#   NAME start --dir D      data D/NAME/, log D/logs/NAME.log, pid D/pids/NAME.pid,
#                           KEY=value lines on stdout and in D/env/NAME.env
#   NAME stop  --dir D
# Only KEY=value lines go to stdout; everything else goes to stderr or the log.

set -euo pipefail

IMHUB_CACHE_DIR=${IMHUB_CACHE_DIR:-$HOME/.cache/imhub}
# shellcheck disable=SC2034  # used by the sourcing scripts
SERVICES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Set by the sourcing script before calling anything below.
SERVICE=${SERVICE:-unknown}

log() { printf '[%s] %s\n' "$SERVICE" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$SERVICE" "$*" >&2; exit 1; }

# usage_common [EXTRA_LINE...]: print usage (plus service-specific lines), exit 2.
usage_common() {
    local me line
    me=$(basename "$0")
    {
        printf 'usage: %s install\n       %s start --dir D\n       %s stop  --dir D\n' "$me" "$me" "$me"
        for line in "$@"; do printf '       %s %s\n' "$me" "$line"; done
    } >&2
    exit 2
}

# parse_dir_arg "$@": sets DIR (absolute) from "--dir D" / "--dir=D"; leftover
# positional arguments end up in the ARGS array.
parse_dir_arg() {
    DIR=""
    ARGS=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --dir) [ $# -ge 2 ] || die "--dir needs a value"; DIR=$2; shift 2 ;;
            --dir=*) DIR=${1#--dir=}; shift ;;
            *) ARGS+=("$1"); shift ;;
        esac
    done
    [ -n "$DIR" ] || die "missing --dir D"
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    # Per-service layout.
    DATA_DIR=$DIR/$SERVICE
    LOG_FILE=$DIR/logs/$SERVICE.log
    PID_FILE=$DIR/pids/$SERVICE.pid
    ENV_FILE=$DIR/env/$SERVICE.env
    mkdir -p "$DATA_DIR" "$DIR/logs" "$DIR/pids" "$DIR/env"
}

# ---------------------------------------------------------------- apt packages

# Debian packages that are not installed (or only half-installed).
apt_missing() {
    local p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            printf '%s\n' "$p"
        fi
    done
}

# apt_ensure PKG...: install whatever is missing with one apt-get call.
# Packaged daemons that apt may start (e.g. redis on 6379) are stopped and
# disabled right away: tests only use the instances started by these scripts.
apt_ensure() {
    local missing p
    missing=$(apt_missing "$@" | tr '\n' ' ')
    [ -n "${missing// /}" ] || return 0
    log "installing Debian packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >&2
    for p in $missing; do
        case "$p" in
            postgresql|postgresql-15) disable_system_service postgresql ;;
            redis-server) disable_system_service redis-server ;;
            coturn) disable_system_service coturn ;;
        esac
    done
}

# Stop and disable a packaged system service.  Works with and without systemd
# (without it, Debian's policy-rc.d in containers usually prevents the start
# in the first place).
disable_system_service() {
    local svc=$1
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    else
        if [ -x "/etc/init.d/$svc" ]; then
            "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null; then
            update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
    fi
}

# stop_system_service_if_running SERVICE PIDFILE COMM: cheap check used by every
# install, in case the packaged daemon got started some other way.
stop_system_service_if_running() {
    local svc=$1 pidfile=$2 comm=$3 pid
    [ -f "$pidfile" ] || return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    if pid_alive "$pid" "$comm"; then
        log "packaged $svc is running (pid $pid); stopping and disabling it"
        disable_system_service "$svc"
    fi
}

# ---------------------------------------------------------------- env file

# env_get KEY: value of KEY in $ENV_FILE, empty if absent.
env_get() {
    [ -f "$ENV_FILE" ] || return 0
    sed -n "s/^$1=//p" "$ENV_FILE" | tail -n 1
}

# env_set KEY VALUE: add/replace one line in $ENV_FILE (used to record ports
# before the process starts, so a failed first start still keeps them).
env_set() {
    local tmp=$ENV_FILE.tmp.$$
    {
        if [ -f "$ENV_FILE" ]; then grep -v "^$1=" "$ENV_FILE" || true; fi
        printf '%s=%s\n' "$1" "$2"
    } >"$tmp"
    mv -f "$tmp" "$ENV_FILE"
}

# emit_env KEY=value...: rewrite $ENV_FILE with exactly these lines and print them.
emit_env() {
    local tmp=$ENV_FILE.tmp.$$
    printf '%s\n' "$@" >"$tmp"
    mv -f "$tmp" "$ENV_FILE"
    printf '%s\n' "$@"
}

# print_env: print the recorded env file (service already running).
print_env() { grep -E '^[A-Z0-9_]+=' "$ENV_FILE"; }

# ---------------------------------------------------------------- ports

# port_free PORT [tcp|udp|both] [COUNT]: true when 127.0.0.1:PORT .. PORT+COUNT-1
# can all be bound now.
port_free() {
    python3 - "$1" "${2:-tcp}" "${3:-1}" <<'PY'
import socket, sys
first, proto, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
kinds = {"tcp": [socket.SOCK_STREAM], "udp": [socket.SOCK_DGRAM],
         "both": [socket.SOCK_STREAM, socket.SOCK_DGRAM]}[proto]
for port in range(first, first + count):
    for kind in kinds:
        s = socket.socket(socket.AF_INET, kind)
        # TCP: SO_REUSEADDR like the servers themselves, so connections of a
        # killed server lingering in TIME_WAIT do not count as "busy" (a
        # listener still does).  UDP: no SO_REUSEADDR, which would let us
        # share a bound port.
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            sys.exit(f"port {port} is busy")
        finally:
            s.close()
PY
}

# pick_ports COUNT [tcp|udp|both]: print the first port of COUNT consecutive free
# loopback ports.  Candidates come from 20000-32767, below Linux's default
# ephemeral range (32768+), so outgoing connections do not grab a recorded port
# between a kill -9 and the restart.
pick_ports() {
    python3 - "$1" "${2:-tcp}" <<'PY'
import random, socket, sys
count, proto = int(sys.argv[1]), sys.argv[2]
kinds = {"tcp": [socket.SOCK_STREAM], "udp": [socket.SOCK_DGRAM],
         "both": [socket.SOCK_STREAM, socket.SOCK_DGRAM]}[proto]
def free(port):
    for kind in kinds:
        s = socket.socket(socket.AF_INET, kind)
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        finally:
            s.close()
    return True
rng = random.SystemRandom()
for _ in range(500):
    base = rng.randrange(20000, 32768 - count)
    if all(free(p) for p in range(base, base + count)):
        print(base)
        sys.exit(0)
sys.exit("no free port range found")
PY
}

# recorded_port KEY [COUNT] [PROTO]: the port recorded under KEY in the env file,
# or a newly picked one that is then recorded.  A recorded port that is now busy
# is an error (something else took it; the caller must not silently move).
recorded_port() {
    local key=$1 count=${2:-1} proto=${3:-tcp} port
    port=$(env_get "$key")
    if [ -z "$port" ]; then
        port=$(pick_ports "$count" "$proto") || die "could not find $count free port(s)"
        env_set "$key" "$port"
        log "picked $key=$port"
    fi
    local why
    why=$(port_free "$port" "$proto" "$count" 2>&1) \
        || die "recorded port(s) $key=$port (+$((count - 1))) from $ENV_FILE: $why (another process holds it)"
    printf '%s\n' "$port"
}

# ---------------------------------------------------------------- processes

# pid_alive PID [PATTERN]: PID runs and (if given) its command line matches PATTERN.
pid_alive() {
    local pid=$1 pattern=${2:-}
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    # A zombie is not alive for our purposes.
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
    [ -z "$pattern" ] && return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern"
}

# running_pid PATTERN: print the pid from $PID_FILE if that process still runs.
running_pid() {
    local pid
    [ -f "$PID_FILE" ] || return 1
    pid=$(tr -dc '0-9' <"$PID_FILE")
    pid_alive "$pid" "$1" || return 1
    printf '%s\n' "$pid"
}

# launch CMD...: start CMD detached in its own session (so its whole process
# group can be cleaned up later), output appended to $LOG_FILE, pid in $PID_FILE.
# In a non-interactive script the background child is not a process-group leader,
# so setsid does not fork again and $! is the server's own pid.
launch() {
    printf '\n===== %s starting %s =====\n' "$(date '+%F %T')" "$SERVICE" >>"$LOG_FILE"
    setsid "$@" </dev/null >>"$LOG_FILE" 2>&1 &
    local pid=$!
    printf '%s\n' "$pid" >"$PID_FILE"
    LAUNCHED_PID=$pid
}

# reap_group PGID PATTERN: kill leftover members of an old process group whose
# leader was killed with -9 (e.g. postgres backends).  Only processes whose
# command line matches PATTERN are touched.
reap_group() {
    local pgid=$1 pattern=$2 pids p i
    [ -n "$pgid" ] || return 0
    for i in $(seq 1 50); do
        # Live members only: zombies (not yet reaped by init) do not count.
        pids=""
        for p in $(pgrep -g "$pgid" 2>/dev/null || true); do
            pid_alive "$p" && pids="$pids $p"
        done
        [ -n "$pids" ] || return 0
        [ "$i" -lt 50 ] && sleep 0.2
    done
    for p in $pids; do
        if pid_alive "$p" "$pattern"; then
            log "killing leftover process $p of old group $pgid"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    sleep 0.2
}

# tail_log: last lines of the log, to stderr (for error reports).
tail_log() {
    printf -- '----- last 40 lines of %s -----\n' "$LOG_FILE" >&2
    tail -n 40 "$LOG_FILE" >&2 2>/dev/null || true
    printf -- '-----\n' >&2
}

# wait_until TIMEOUT_S WHAT CMD...: run CMD (quietly) every 0.3 s until it
# succeeds.  Fails early if the launched process died; on timeout prints the log
# tail.  Bounded by TIMEOUT_S wall-clock seconds.
wait_until() {
    local timeout=$1 what=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    while true; do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if [ -n "${LAUNCHED_PID:-}" ] && ! pid_alive "$LAUNCHED_PID"; then
            tail_log
            rm -f "$PID_FILE"
            die "$SERVICE exited while waiting for: $what (log: $LOG_FILE)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail_log
            die "timed out after ${timeout}s waiting for: $what (log: $LOG_FILE; process still running, pid ${LAUNCHED_PID:-?})"
        fi
        sleep 0.3
    done
}

# stop_service PATTERN [SIGNAL] [TIMEOUT_S] [CHILD_PATTERN]: send SIGNAL
# (default TERM) to the recorded pid (its command line must contain PATTERN),
# wait up to TIMEOUT_S, then SIGKILL its process group.  Leftover group members
# matching CHILD_PATTERN (default PATTERN) are killed too.  Removes the pid
# file.  Succeeds when nothing was running.
stop_service() {
    local pattern=$1 sig=${2:-TERM} timeout=${3:-30} child_pattern=${4:-$1} pid
    if ! pid=$(running_pid "$pattern"); then
        log "not running"
        # Leader was killed -9 earlier: clean up children it may have left.
        if [ -f "$PID_FILE" ]; then
            reap_group "$(tr -dc '0-9' <"$PID_FILE")" "$child_pattern"
        fi
        rm -f "$PID_FILE"
        return 0
    fi
    log "stopping pid $pid (SIG$sig)"
    kill -"$sig" "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + timeout))
    while pid_alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.2
    done
    if pid_alive "$pid"; then
        log "still running after ${timeout}s, sending SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        sleep 0.3
    fi
    # Children that outlive the leader (same process group, matching pattern).
    reap_group "$pid" "$child_pattern"
    rm -f "$PID_FILE"
    log "stopped"
}

# already_running PATTERN READY_CMD...: when the recorded process is alive and
# answers, print the recorded env and return 0 (start is then a no-op).
already_running() {
    local pattern=$1 pid
    shift
    pid=$(running_pid "$pattern") || return 1
    [ -f "$ENV_FILE" ] || return 1
    # It may still be starting (another start in progress): give it 20 s.
    local deadline=$((SECONDS + 20))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if "$@" >/dev/null 2>&1; then
            log "already running (pid $pid)"
            print_env
            return 0
        fi
        pid_alive "$pid" || return 1
        sleep 0.5
    done
    die "pid $pid from $PID_FILE is running but does not answer; run stop first"
}

# Seconds (with ms) since the script started, for timing messages.
_T0=$(date +%s.%N)
elapsed() { python3 -c "import sys,time; print(f'{time.time()-float(sys.argv[1]):.1f}s')" "$_T0"; }
