# Shared by the launch scripts (sourced, not run). Plain bash; needs `ray` and `python` on PATH
# (activate the project's venv first). Nothing here runs `ray stop`: each node the scripts start
# is recorded (its process group and temp dir) so that stop.sh ends exactly those processes.

SHARDLINE_TMP="${TMPDIR:-/tmp}"
SHARDLINE_STATE_DIR="${SHARDLINE_STATE_DIR:-$SHARDLINE_TMP/shardline-launch-$(id -u)}"
NODES_FILE="$SHARDLINE_STATE_DIR/nodes"        # one line per started node: PGID TEMP_DIR ROLE
HEADS_FILE="$SHARDLINE_STATE_DIR/heads"        # one line per started head: CLUSTER_ADDRESS JOB_ADDRESS
DEFAULT_OBJECT_STORE_BYTES=$((2 * 1024 * 1024 * 1024))

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
say() { echo "[shardline] $*"; }

need_tools() {
    command -v ray >/dev/null || die "\`ray\` is not on PATH; activate the project's venv (source .venv/bin/activate)"
    command -v python >/dev/null || die "\`python\` is not on PATH; activate the project's venv (source .venv/bin/activate)"
}

free_port() {
    python - <<'PY'
import socket
with socket.socket() as s:
    s.bind(("", 0))
    print(s.getsockname()[1])
PY
}

# The network interface that carries IP $1 (gloo and NCCL must use the one Ray binds, or a
# multi-homed node hangs in its first collective trying an address its peers cannot reach).
iface_for_ip() {
    python - "$1" <<'PY'
import socket, sys
import psutil
ip = sys.argv[1]
for name, addrs in psutil.net_if_addrs().items():
    if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
        print(name)
        sys.exit(0)
sys.exit(1)
PY
}

# The address Ray itself would bind on this machine (its own choice: the default route's source).
default_ip() {
    python -c 'from ray._private.services import get_node_ip_address; print(get_node_ip_address())'
}

# The address of this machine that the route to host $1 (the head) leaves from.
route_ip() {
    python - "$1" <<'PY'
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.connect((socket.gethostbyname(sys.argv[1]), 9))   # UDP connect sends nothing; it only picks the route
    print(s.getsockname()[0])
PY
}

# Exports what every Ray process of this node inherits: worker niceness, the collectives' interface.
export_node_env() {
    local ip="$1" ifname
    ifname="$(iface_for_ip "$ip")" || die "no network interface carries $ip; pass --node-ip-address with an address of this machine"
    # Ray starts workers at nice 15; Shardline's workers do all the model's work
    export RAY_worker_niceness=0
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$ifname}"
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$ifname}"
    say "node address $ip: collectives use interface GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME"
    if [[ "$ip" == 127.* ]]; then
        # Ray swaps a loopback address for a routable one unless told not to; with this set the
        # node stays on 127.0.0.1, and the cluster is this machine only (no worker can join it)
        export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
        say "bound to loopback: a single-machine cluster (worker nodes cannot join a loopback head)"
    fi
    say "RAY_worker_niceness=0 (Ray's default of 15 starves the model workers)"
}

token_file() { echo "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"; }

how_to_get_token() {
    cat <<MSG
Token authentication is on (RAY_AUTH_MODE=token) but no token was found: RAY_AUTH_TOKEN is unset and $(token_file) does not exist.
Get the head's token: on the head machine run \`ray get-auth-token\` (or read the token file that start_head.sh printed), then on this machine either
  - save it to ~/.ray/auth_token (e.g. scp HEAD:~/.ray/auth_token ~/.ray/auth_token && chmod 600 ~/.ray/auth_token), or
  - export RAY_AUTH_TOKEN_PATH=/path/to/that/file, or
  - export RAY_AUTH_TOKEN=<the token>.
Only for a cluster where every node opted out with RAY_AUTH_MODE=disabled can you skip this (not recommended).
MSG
}

# Token authentication, as Ray documents it: RAY_AUTH_MODE=token on every node and client, the
# token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
# $1 = head: create the token file if there is none. $1 = join: the token must already be here.
setup_auth() {
    local role="$1" file
    if [[ "${RAY_AUTH_MODE:-}" == "disabled" ]]; then
        say "WARNING: token authentication is OFF (RAY_AUTH_MODE=disabled, an explicit opt-out): anyone who can reach this cluster's ports can run code on it"
        return 0
    fi
    [[ -z "${RAY_AUTH_MODE:-}" || "${RAY_AUTH_MODE}" == "token" ]] \
        || die "RAY_AUTH_MODE=$RAY_AUTH_MODE is not understood here; use token (the default) or disabled"
    export RAY_AUTH_MODE=token
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        say "token authentication ON (token from RAY_AUTH_TOKEN)"
        return 0
    fi
    file="$(token_file)"
    if [[ ! -s "$file" ]]; then
        [[ "$role" == "head" ]] || { how_to_get_token >&2; exit 3; }
        mkdir -p "$(dirname "$file")"
        (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' > "$file")
        say "generated a new cluster token in $file"
    fi
    say "token authentication ON (token file $file); every other node and client needs this token: copy the file to ~/.ray/auth_token there, or set RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN"
}

# Starts `ray start ... --block` in its own session (process group) and records it.
# $1 = role, $2 = temp dir, $3 = log file, rest = ray start arguments.
start_node() {
    local role="$1" temp_dir="$2" log="$3"
    shift 3
    mkdir -p "$SHARDLINE_STATE_DIR" "$temp_dir"
    setsid ray start "$@" --temp-dir="$temp_dir" --block >"$log" 2>&1 < /dev/null &
    local pgid=$!
    echo "$pgid $temp_dir $role" >> "$NODES_FILE"
    echo "$pgid" > "$temp_dir/shardline-$role.pgid"
    NODE_PGID=$pgid
}

# Waits until the node's raylet is up (ray start --block prints its banner), or fails with the log.
wait_started() {
    local pgid="$1" log="$2" timeout="${3:-120}" t=0
    until grep -q "Ray runtime started" "$log" 2>/dev/null; do
        if ! kill -0 "$pgid" 2>/dev/null; then
            echo "--- ray start log ($log) ---" >&2; tail -n 40 "$log" >&2
            die "ray start exited before the node came up (log above)"
        fi
        (( t++ >= timeout )) && { tail -n 40 "$log" >&2; die "the node did not come up within ${timeout}s (log above)"; }
        sleep 1
    done
}
