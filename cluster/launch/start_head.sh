#!/usr/bin/env bash
# Start a Ray head node set up for Shardline; the last line printed is the cluster address.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=_common.sh
source "$HERE/_common.sh"

usage() {
    cat <<'TXT'
Usage: start_head.sh [--port P] [--temp-dir DIR] [--num-cpus N] [--node-ip-address IP]
                     [--dashboard-port P] [--object-store-memory BYTES] [-- EXTRA_RAY_START_ARGS...]

Starts a Ray head on this machine, in the background, with what Shardline needs:
  - token authentication on (RAY_AUTH_MODE=token); the token is RAY_AUTH_TOKEN, else the file
    RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, created if missing. Opt out explicitly with
    RAY_AUTH_MODE=disabled (not recommended: anyone reaching the ports can run code);
  - RAY_worker_niceness=0, so model workers are not starved;
  - GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME set to the interface that carries the bound address
    (an already exported value wins);
  - an object store of --object-store-memory bytes (default 2 GiB; Shardline only moves small
    step messages and Ray Data blocks through it, and Ray's default of 30% of RAM takes memory
    the model shards need).

Options (the environment variable in brackets sets the default):
  --port P                 GCS port (default 6379) [SHARDLINE_HEAD_PORT]
  --temp-dir DIR           Ray's temp/session dir for this node (default ${TMPDIR:-/tmp}/shardline-ray/head)
  --num-cpus N             CPUs this node offers (default: what Ray detects) [SHARDLINE_NUM_CPUS]
  --node-ip-address IP     address to bind (default: the address of the default route) [SHARDLINE_NODE_IP]
  --dashboard-port P       dashboard / job-submission HTTP port (default 8265) [SHARDLINE_DASHBOARD_PORT]
  --object-store-memory B  object store size in bytes
  -h, --help               this text

Prints the job-submission address (for submit.sh --address) and, as the LAST line, the cluster
address that start_worker.sh and LLM(address=...) take. Stop it with stop.sh (never `ray stop`,
which ends every Ray on the machine).
TXT
}

port="${SHARDLINE_HEAD_PORT:-6379}"; temp_dir="$SHARDLINE_TMP/shardline-ray/head"; num_cpus="${SHARDLINE_NUM_CPUS:-}"
ip="${SHARDLINE_NODE_IP:-}"; dash_port="${SHARDLINE_DASHBOARD_PORT:-8265}"
object_store=$DEFAULT_OBJECT_STORE_BYTES; extra=()
while (($#)); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --port) port="${2:?--port needs a value}"; shift 2 ;;
        --temp-dir) temp_dir="${2:?--temp-dir needs a value}"; shift 2 ;;
        --num-cpus) num_cpus="${2:?--num-cpus needs a value}"; shift 2 ;;
        --node-ip-address) ip="${2:?--node-ip-address needs a value}"; shift 2 ;;
        --dashboard-port) dash_port="${2:?--dashboard-port needs a value}"; shift 2 ;;
        --object-store-memory) object_store="${2:?--object-store-memory needs a value}"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) usage >&2; die "unknown option '$1' (see --help)" ;;
    esac
done
need_tools
[[ -n "$ip" ]] || ip="$(default_ip)"
(( ${#temp_dir} <= 60 )) || die "--temp-dir '$temp_dir' is too long: Ray's unix socket paths must stay under 108 bytes; use a short dir under /tmp"
temp_dir="$(mkdir -p "$temp_dir" && cd "$temp_dir" && pwd)"

setup_auth head
export_node_env "$ip"

args=(--head --port="$port" --node-ip-address="$ip" --object-store-memory="$object_store"
      --include-dashboard=true --dashboard-host="$ip" --dashboard-port="$dash_port"
      --dashboard-agent-listen-port="$(free_port)" --disable-usage-stats)
[[ -n "$num_cpus" ]] && args+=(--num-cpus="$num_cpus")
log="$temp_dir/shardline-head.log"
start_node head "$temp_dir" "$log" "${args[@]}" "${extra[@]}"
wait_started "$NODE_PGID" "$log"

# the job API answers once the dashboard is up; submit.sh needs it
python - "http://$ip:$dash_port/api/version" <<'PY' || die "the dashboard did not answer at http://$ip:$dash_port (see $log)"
import sys, time, urllib.request, urllib.error
deadline = time.monotonic() + 90
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2).close()
        break
    except urllib.error.HTTPError:   # 401/403: up, and asking for the token
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.5)
PY
echo "$ip:$port http://$ip:$dash_port" >> "$HEADS_FILE"
say "head started: process group $NODE_PGID, temp dir $temp_dir, log $log"
say "job submission address: http://$ip:$dash_port (submit.sh --address takes it, or the cluster address below)"
say "join a worker: cluster/launch/start_worker.sh $ip:$port ; stop: cluster/launch/stop.sh"
echo "$ip:$port"
