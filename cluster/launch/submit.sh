#!/usr/bin/env bash
# Submit a command as a Ray job with this repository as its working dir, follow its logs, exit with its status.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=_common.sh
source "$HERE/_common.sh"

EXCLUDES='[".venv", ".git", "**/__pycache__", "benchmarks/results", "*.egg-info", "build", "dist"]'

usage() {
    cat <<TXT
Usage: submit.sh --address ADDRESS [--runtime-env-json JSON] -- CMD [ARG...]

Runs \`ray job submit --working-dir . -- CMD ...\` from the current directory (the repository
root: the job imports cluster/, sharding/ and scheduler/ from the upload), with the project's
excludes ($EXCLUDES), follows the job's logs and exits 0 only if the job SUCCEEDED
(1 if it FAILED or was STOPPED).

  --address ADDRESS   the job-submission address (http://HOST:8265), or the cluster address
                      start_head.sh printed last (HOST:PORT; its job address is looked up
                      among the heads started here, else http://HOST:8265 is assumed)
  --runtime-env-json  extra runtime_env fields, merged with the excludes (e.g. env_vars)

Token authentication: sends the cluster token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token) unless RAY_AUTH_MODE=disabled. \`python\` in CMD is the cluster's python:
start the nodes from the project's venv.
TXT
}

address=""; user_env='{}'
while (($#)); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --address) address="${2:?--address needs a value}"; shift 2 ;;
        --runtime-env-json) user_env="${2:?--runtime-env-json needs a value}"; shift 2 ;;
        --) shift; break ;;
        *) usage >&2; die "unknown option '$1'; put the job's command after -- (see --help)" ;;
    esac
done
(($#)) || { usage >&2; die "no command: give it after --, e.g. -- python examples/batch_ray_data.py ..."; }
[[ -n "$address" ]] || address="${RAY_ADDRESS:-}"
[[ -n "$address" ]] || die "--address is required: the job-submission address start_head.sh printed (http://HOST:8265)"
need_tools
[[ -d cluster && -d sharding && -d scheduler ]] \
    || die "run submit.sh from the repository root: the job's working dir (.) must hold cluster/, sharding/ and scheduler/"
if [[ "$address" != *://* ]]; then
    job_address="$(awk -v a="$address" '$1 == a {print $2}' "$HEADS_FILE" 2>/dev/null | tail -n 1)"
    address="${job_address:-http://${address%:*}:8265}"
fi
setup_auth join

runtime_env="$(python - "$EXCLUDES" "$user_env" <<'PY'
import json, sys
env = json.loads(sys.argv[2])
env["excludes"] = json.loads(sys.argv[1]) + list(env.get("excludes", []))
print(json.dumps(env))
PY
)" || die "--runtime-env-json is not a JSON object: $user_env"

# `ray job submit` (without --no-wait) uploads the working dir, follows the logs until the job
# ends, and exits 0 even when the job failed: the final status is asked of the job API.
job_id="shardline-$(date +%Y%m%d-%H%M%S)-$$"
set +e
ray job submit --address "$address" --submission-id "$job_id" --working-dir . \
    --runtime-env-json "$runtime_env" -- "$@"
rc=$?
set -e
status="$(python - "$address" "$job_id" <<'PY' 2>/dev/null
import sys
from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)
PY
)" || status=""
if [[ -z "$status" ]]; then
    say "job $job_id was not accepted (ray job submit exited $rc; see its message above)"
    exit $(( rc ? rc : 1 ))
fi
say "job $job_id: $status"
[[ "$status" == "SUCCEEDED" ]]
