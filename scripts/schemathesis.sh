#!/usr/bin/env bash
# Fuzzes the REST API with schemathesis (PyPI) on a real server: our openapi.yml, then the original
# VoidRun contract (../shared/reference/voidrun-openapi.yml, when it is there) with our server as its
# base URL, then our sandbox operations against one running sandbox. Only `not_a_server_error` fails
# the run: any 5xx, or a request the server never answers.
#
#   scripts/schemathesis.sh                                  # the bounded CI budget (8 examples per operation)
#   SCHEMATHESIS_MAX_EXAMPLES=200 scripts/schemathesis.sh    # the long version
#   SCHEMATHESIS_ARGS='--include-path-regex files' scripts/schemathesis.sh   # extra `st run` options
#
# schemathesis is installed by this script into a cached virtualenv ($VOIDRUN_CACHE_DIR, default
# ~/.cache/voidrun). The server runs from this checkout (tsx) with a temporary DATA_DIR (SQLite
# store), its own runc root and a free loopback port; the sandboxes a run creates are deleted through
# the API before it stops. JUnit reports go to $SCHEMATHESIS_REPORT_DIR when set; the work directory
# (server log, reports, `st replay` cache) is kept only when the run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

version=4.32.5
max_examples=${SCHEMATHESIS_MAX_EXAMPLES:-8}
cache_dir=${VOIDRUN_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/voidrun}
venv="$cache_dir/schemathesis-$version"
reference=${VOIDRUN_REFERENCE_CONTRACT:-../shared/reference/voidrun-openapi.yml}

if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$version"; then
  echo "installing schemathesis $version into $venv"
  rm -rf "$venv"
  mkdir -p "$cache_dir"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi

work=$(mktemp -d /tmp/voidrun-schemathesis.XXXXXX)
chmod 711 "$work" # sandboxes resolve their mounts as an unprivileged uid
report_dir=$(realpath -m "${SCHEMATHESIS_REPORT_DIR:-$work/report}")
runc_root="/run/voidrun-schemathesis/$(basename "$work")"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
server_pid=
api_key=
keys=() # every key registered, for the cleanup

cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    for key in "${keys[@]}"; do delete_sandboxes "$key" || true; done
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  # Anything the API could not delete (a sandbox stuck mid-operation) goes with its runc root.
  if command -v runc >/dev/null 2>&1 && [ -d "$runc_root" ]; then
    for id in $(runc --root "$runc_root" list -q 2>/dev/null); do runc --root "$runc_root" delete -f "$id" >/dev/null 2>&1 || true; done
  fi
  rm -rf "$runc_root"
  # And what such a sandbox still holds under the work directory: mounts, then loop devices.
  grep -o " $work/[^ ]*" /proc/mounts 2>/dev/null | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done || true
  losetup -a 2>/dev/null | grep -F "$work/" | cut -d: -f1 | while read -r dev; do losetup -d "$dev" 2>/dev/null || true; done || true
  if [ "${keep_work:-0}" != 1 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

# Deletes every sandbox of the key's organization (the only one it can see).
delete_sandboxes() {
  local key=$1 ids
  for _ in 1 2 3; do
    ids=$(curl -fsS -H "X-API-Key: $key" "$base/api/sandboxes?limit=100" | python3 -c 'import json, sys; print(" ".join(s["id"] for s in json.load(sys.stdin).get("data", [])))') || return 0
    [ -z "$ids" ] && return 0
    for id in $ids; do curl -sS -o /dev/null -X DELETE -H "X-API-Key: $key" "$base/api/sandboxes/$id" || true; done
  done
}

echo "starting the server on $base (data in $work)"
env -u MONGO_URI \
  SERVER_HOST=127.0.0.1 SERVER_PORT="$port" LOG_LEVEL=warn \
  DATA_DIR="$work/data" INSTANCES_DIR="$work/instances" SNAPSHOTS_DIR="$work/snapshots" RUNC_ROOT="$runc_root" \
  PREPARE_DEFAULT_IMAGE=false HEALTH_ENABLED=false SANDBOX_NETWORK=none \
  node_modules/.bin/tsx server/main.ts >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
  curl -fsS -o /dev/null "$base/api/version" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; echo "the server exited before answering"; exit 1; }
  sleep 0.2
done

registrations=0
register() {
  registrations=$((registrations + 1))
  api_key=$(curl -fsS -H 'content-type: application/json' -d "{\"name\":\"Schemathesis\",\"email\":\"schemathesis-$registrations@example.com\"}" "$base/api/register" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["data"]["apiKey"])')
  keys+=("$api_key")
}
register

# Operations left out, each with its reason:
# - /sandboxes/{id}/pty and /pty/sessions/{sessionId} GET, files/watch/{sessionId}/stream: WebSocket
#   upgrades; a plain GET is answered 426/400 and schemathesis cannot speak the protocol.
# - /metrics: not an API operation (a Prometheus text page).
# - commands/wait and commands/attach: they answer when the process ends, as the original's do; the
#   process a generated pid names (e.g. the contract example `sleep 3600`) outlives any budget.
#   test/conformance.test.ts runs both.
# - /sandboxes/{id}/ports/{port}/{path}: the answer is the sandbox's own server's; nothing listening
#   there is a 502 by design (UPSTREAM_UNAVAILABLE). test/ports-preview.test.ts drives it.
excluded=(--exclude-path-regex '/pty$|/pty/sessions/\{sessionId\}$|/stream$|^/metrics$|/commands/(wait|attach)$|/ports/\{port\}/\{path\}$')
common=(--url "$base/api" -c not_a_server_error --max-examples "$max_examples"
  --phases examples,coverage,fuzzing --request-timeout 60 --suppress-health-check all --no-shrink
  --warnings off --generation-database none --report junit --report-dir "$report_dir")

# Every run caps the timeout of the execs it generates (scripts/schemathesis_hooks.py): an example like
# `sleep 3600` costs seconds of the budget, not the 30 s default.
export SCHEMATHESIS_HOOKS="$PWD/scripts/schemathesis_hooks.py"
status=0
run() {
  local name=$1 spec
  spec=$(realpath "$2")
  shift 2
  echo
  echo "== schemathesis over $name ($spec), max $max_examples examples per operation"
  # From the work directory: schemathesis keeps what it found for `st replay` in ./.schemathesis.
  # shellcheck disable=SC2086 # SCHEMATHESIS_ARGS is a list of options
  if ! (cd "$work" && "$venv/bin/st" run "$spec" -H "X-API-Key: $api_key" "${common[@]}" --report-junit-path "$report_dir/$name.xml" "${excluded[@]}" "$@" ${SCHEMATHESIS_ARGS:-}); then
    status=1
  fi
}

# A run can revoke or deactivate its own key (the key routes are fuzzed too): the next run gets a new one.
key_still_works() {
  curl -fsS -o /dev/null -H "X-API-Key: $api_key" "$base/api/orgs/me" 2>/dev/null
}

fresh_key() {
  if ! key_still_works; then
    echo "(the run revoked its own API key; registering another for the next run)"
    register
  fi
}

run ours openapi.yml
if [ -f "$reference" ]; then
  fresh_key
  run original "$reference"
else
  echo "the original contract ($reference) is not there: only our openapi.yml was fuzzed"
fi

# The runs above mostly name sandboxes that do not exist or that they stopped. This one sends every
# request of the sandbox's own operations to one running sandbox (scripts/schemathesis_hooks.py), so
# the generated commands, paths and bodies reach its agent. Left out here: the lifecycle operations
# (they would stop it) and commands/kill (a generated pid can be the agent's own process).
# A new organization, so the sandboxes the runs above made count against no quota of this one.
for key in "${keys[@]}"; do delete_sandboxes "$key" || true; done
register
target=$(curl -fsS -H "X-API-Key: $api_key" -H 'content-type: application/json' -d '{"name":"fuzz-target","sync":true}' "$base/api/sandboxes" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["data"]["id"])')
export VOIDRUN_FUZZ_SANDBOX="$target"
run sandbox openapi.yml --include-path-regex '^/sandboxes/\{id\}/(exec|exec-stream|session-exec|session-exec-stream|commands/(run|list)|files(/.*)?|pty/sessions(/\{sessionId\}/(execute|buffer|resize))?|ports(/\{port\}(/token)?)?|public-urls)$'

if [ "$status" != 0 ]; then
  echo "schemathesis found server errors (above; server log: $work/server.log)"
  keep_work=1
  echo "--- errors the server logged (at most 20)"
  grep '"level":50' "$work/server.log" | tail -n 20 || true
fi
exit "$status"
