#!/usr/bin/env bash
# Join this machine to a Shardline Ray cluster as a worker node, with the head's settings.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=_common.sh
source "$HERE/_common.sh"

usage() {
    cat <<'TXT'
Usage: start_worker.sh ADDRESS [--num-cpus N] [--temp-dir DIR] [--node-ip-address IP]
                       [--object-store-memory BYTES] [-- EXTRA_RAY_START_ARGS...]

Joins the cluster whose head printed ADDRESS (host:port, the last line of start_head.sh), in the
background, with the same settings as the head: token authentication (the head's token must be
here: ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN; see the README), RAY_worker_niceness=0,
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME from the address this node binds, and the object store size.
Several workers may run on one machine: each gets its own temp dir and ports.

Options:
  --num-cpus N             CPUs this node offers (default: what Ray detects)
  --temp-dir DIR           Ray's temp dir for this node (default ${TMPDIR:-/tmp}/shardline-ray/worker-<pid>)
  --node-ip-address IP     address to bind (default: the one the route to the head leaves from)
  --object-store-memory B  object store size in bytes (default 2 GiB)
  -h, --help               this text

Stop it with stop.sh.
TXT
}

address=""; num_cpus="${SHARDLINE_NUM_CPUS:-}"; temp_dir="$SHARDLINE_TMP/shardline-ray/worker-$$"; ip="${SHARDLINE_NODE_IP:-}"
object_store=$DEFAULT_OBJECT_STORE_BYTES; extra=()
while (($#)); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --num-cpus) num_cpus="${2:?--num-cpus needs a value}"; shift 2 ;;
        --temp-dir) temp_dir="${2:?--temp-dir needs a value}"; shift 2 ;;
        --node-ip-address) ip="${2:?--node-ip-address needs a value}"; shift 2 ;;
        --object-store-memory) object_store="${2:?--object-store-memory needs a value}"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -*) usage >&2; die "unknown option '$1' (see --help)" ;;
        *) [[ -z "$address" ]] || die "one ADDRESS only (got '$address' and '$1')"; address="$1"; shift ;;
    esac
done
[[ -n "$address" ]] || { usage >&2; die "ADDRESS is required: the host:port start_head.sh printed last"; }
[[ "$address" =~ ^[^:/]+:[0-9]+$ ]] || die "ADDRESS '$address' must be host:port (the last line start_head.sh printed)"
need_tools
if [[ "$address" == 127.* || "$address" == localhost:* ]]; then
    die "the head at $address is bound to loopback: Ray's CLI accepts no worker nodes for it (keeping a node on 127.0.0.1 needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, with which \`ray start --address\` refuses to join). Start the head with --node-ip-address set to this machine's network address (e.g. \$(hostname -I | cut -d' ' -f1)) and join that address"
fi
head_host="${address%:*}"; head_port="${address##*:}"
[[ -n "$ip" ]] || ip="$(route_ip "$head_host")"
(( ${#temp_dir} <= 60 )) || die "--temp-dir '$temp_dir' is too long: Ray's unix socket paths must stay under 108 bytes"
python -c "import socket,sys; socket.create_connection(('$head_host', $head_port), timeout=5).close()" 2>/dev/null \
    || die "nothing answers at $address; start the head first (start_head.sh) or fix ADDRESS"
temp_dir="$(mkdir -p "$temp_dir" && cd "$temp_dir" && pwd)"

setup_auth join
export_node_env "$ip"

# own ports for everything a second node on the same machine would otherwise collide on
args=(--address="$address" --node-ip-address="$ip" --object-store-memory="$object_store"
      --dashboard-agent-listen-port="$(free_port)" --disable-usage-stats)
[[ -n "$num_cpus" ]] && args+=(--num-cpus="$num_cpus")
log="$temp_dir/shardline-worker.log"
start_node worker "$temp_dir" "$log" "${args[@]}" "${extra[@]}"
wait_started "$NODE_PGID" "$log"
say "worker joined $address: process group $NODE_PGID, temp dir $temp_dir, log $log"
