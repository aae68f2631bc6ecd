#!/usr/bin/env bash
# Stop the Ray nodes that start_head.sh / start_worker.sh started - and nothing else.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=_common.sh
source "$HERE/_common.sh"

usage() {
    cat <<TXT
Usage: stop.sh [--temp-dir DIR]

Stops every node the launch scripts started on this machine (recorded in $NODES_FILE,
set SHARDLINE_STATE_DIR to use another registry), or only the node whose temp dir is DIR.
Each node is ended by its process group, then any process still naming its temp dir (Ray
workers) is ended too. Never \`ray stop\`: that ends every Ray on the machine, other users' too.
TXT
}

only=""
while (($#)); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --temp-dir) only="$(cd "${2:?--temp-dir needs a value}" 2>/dev/null && pwd || echo "$2")"; shift 2 ;;
        *) usage >&2; die "unknown option '$1' (see --help)" ;;
    esac
done
[[ -s "$NODES_FILE" ]] || { say "no nodes recorded in $NODES_FILE; nothing to stop"; exit 0; }

# PIDs of processes whose command line names DIR (raylet, GCS, workers, agents of that node)
pids_naming() {
    local dir="$1" p
    for p in /proc/[0-9]*; do
        [[ "${p#/proc/}" == "$$" || "${p#/proc/}" == "$BASHPID" ]] && continue   # this script (its args may name DIR)
        [[ -r "$p/cmdline" ]] || continue
        if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -qF -- "$dir/"; then echo "${p#/proc/}"; fi
    done
}

stop_node() {
    local pgid="$1" dir="$2" role="$3" sig t
    for sig in TERM KILL; do
        kill "-$sig" -- "-$pgid" 2>/dev/null || true
        for p in $(pids_naming "$dir"); do kill "-$sig" "$p" 2>/dev/null || true; done
        for ((t = 0; t < 20; t++)); do
            if ! kill -0 -- "-$pgid" 2>/dev/null && [[ -z "$(pids_naming "$dir")" ]]; then
                say "stopped $role (process group $pgid, $dir)"; return 0
            fi
            sleep 0.5
        done
    done
    say "WARNING: some processes of $role ($dir) are still there: $(pids_naming "$dir" | tr '\n' ' ')"
    return 1
}

status=0; keep=()
# workers first, so they do not spend their last seconds reconnecting to a dead head
mapfile -t lines < <(grep -v ' head$' "$NODES_FILE" || true; grep ' head$' "$NODES_FILE" || true)
for line in "${lines[@]}"; do
    read -r pgid dir role <<< "$line"
    if [[ -n "$only" && "$dir" != "$only" ]]; then keep+=("$line"); continue; fi
    stop_node "$pgid" "$dir" "$role" || { status=1; keep+=("$line"); }
done
if ((${#keep[@]})); then printf '%s\n' "${keep[@]}" > "$NODES_FILE"; else rm -f "$NODES_FILE" "$HEADS_FILE"; fi
exit $status
