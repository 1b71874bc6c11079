#!/usr/bin/env bash
# Start a multi-node Ray cluster for ERC training and submit recipes to it as Ray jobs.
#
# Each job ships this checkout to every node (runtime_env.working_dir, put first on PYTHONPATH) and
# sets VERL_USE_EXTERNAL_MODULES so that every verl process imports the ERC plugin even where the
# package is not pip-installed. verl, vLLM, torch etc. must already be installed on every node.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

RAY_BIN="${RAY_BIN:-ray}"
PYTHON_BIN="${PYTHON_BIN:-python3}"
RAY_PORT="${RAY_PORT:-6379}"
RAY_DASHBOARD_HOST="${RAY_DASHBOARD_HOST:-127.0.0.1}"  # Ray's default: the job API on loopback only
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_NUM_CPUS="${RAY_NUM_CPUS:-}"
RAY_NUM_GPUS="${RAY_NUM_GPUS:-}"
ERC_PLUGIN_MODULES="${ERC_PLUGIN_MODULES:-erc_verl.algorithm.losses}"
ERC_FORWARD_ENV="${ERC_FORWARD_ENV:-WANDB_API_KEY WANDB_PROJECT WANDB_ENTITY HF_TOKEN HF_HOME HF_HUB_OFFLINE HF_ENDPOINT}"
ERC_RAY_EXCLUDES="${ERC_RAY_EXCLUDES:-.git .venv venv __pycache__ data outputs checkpoints ckpts generations wandb *.parquet *.safetensors *.pt}"
ERC_RAY_PIP="${ERC_RAY_PIP:-}"
RAY_JOB_NO_WAIT="${RAY_JOB_NO_WAIT:-0}"

usage() {
  cat <<EOF
Usage: $(basename "$0") <command> [args]

Commands:
  head [ray start args...]      start the head node here and print its address
  worker <head_ip:port> [args]  join this node to the cluster started by 'head'
  submit <recipe.sh> [overrides...]
                                run a recipe (a path inside this repo) as a Ray job on the cluster;
                                extra arguments go to the recipe (Hydra overrides)
  status                        'ray status' for the cluster
  stop                          stop every Ray process on THIS node ('ray stop')

Environment (defaults in brackets):
  RAY_PORT [6379]  RAY_DASHBOARD_PORT [8265]
  RAY_DASHBOARD_HOST [127.0.0.1]  where the dashboard and its job API listen; anyone who reaches them can run
                   code on the cluster, so 0.0.0.0 only on a trusted network (or keep 127.0.0.1 and
                   reach it through an SSH tunnel: ssh -L 8265:127.0.0.1:8265 <head>)
  RAY_HEAD_IP      address to advertise [first of 'hostname -I', else 127.0.0.1]
  RAY_NUM_CPUS / RAY_NUM_GPUS   resources of this node [detected by Ray]
  RAY_JOB_ADDRESS  where 'submit' sends jobs [http://127.0.0.1:\$RAY_DASHBOARD_PORT]
  RAY_JOB_NO_WAIT  1 = submit and return without streaming logs [0]
  ERC_PLUGIN_MODULES  modules verl imports in every process [erc_verl.algorithm.losses]
  ERC_FORWARD_ENV     variables copied into the job when set, besides every \${VAR:-...} knob
                      of recipe/*.sh (DATA_DIR, MODEL_PATH, NNODES, ...) [${ERC_FORWARD_ENV}]
  ERC_RAY_EXCLUDES    paths not uploaded with the checkout [${ERC_RAY_EXCLUDES}]
  ERC_RAY_PIP         extra pip requirements installed for the job, space-separated [none]
  RAY_BIN [ray]  PYTHON_BIN [python3]

Data, models and checkpoints are not uploaded: keep them on storage every node sees at the same path.
The checkout is snapshotted at submit time; if a submit fails with "Failed to download runtime_env
file package", files changed during the upload: submit again.
Ray versions with token authentication (on by default) need the head's ~/.ray/auth_token on every
node (copy it, or export RAY_AUTH_TOKEN), or RAY_AUTH_MODE=disabled everywhere on a trusted network.

Example (2 nodes):
  node0$ scripts/ray_cluster.sh head            # prints e.g. 10.0.0.1:6379
  node1$ scripts/ray_cluster.sh worker 10.0.0.1:6379
  node0$ export DATA_DIR=/shared/erc_data CKPT_DIR=/shared/ckpts NNODES=2
  node0$ scripts/ray_cluster.sh submit recipe/dapo_erc.sh trainer.total_epochs=2
EOF
}

die() { echo "error: $*" >&2; exit 2; }

need_ray() {
  command -v "${RAY_BIN}" >/dev/null 2>&1 || die "'${RAY_BIN}' not found; pip install 'ray[default]' or set RAY_BIN"
}

# Recent Ray starts clusters with token authentication and keeps the token in ~/.ray/auth_token, but
# some clients (e.g. 'ray status') only send it when RAY_AUTH_MODE=token. An explicit mode is kept.
use_token_if_present() {
  if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] \
      || [[ -f "${RAY_AUTH_TOKEN_PATH:-${HOME:-/nonexistent}/.ray/auth_token}" ]]; }; then
    export RAY_AUTH_MODE=token
  fi
}

head_ip() {
  if [[ -n "${RAY_HEAD_IP:-}" ]]; then echo "${RAY_HEAD_IP}"; return; fi
  local ip=""
  ip="$(hostname -I 2>/dev/null | awk '{print $1}')" || true
  echo "${ip:-127.0.0.1}"
}

resource_args() {
  if [[ -n "${RAY_NUM_CPUS}" ]]; then printf '%s\n' --num-cpus "${RAY_NUM_CPUS}"; fi
  if [[ -n "${RAY_NUM_GPUS}" ]]; then printf '%s\n' --num-gpus "${RAY_NUM_GPUS}"; fi
}

cmd_head() {
  need_ray
  local ip res=()
  ip="$(head_ip)"
  mapfile -t res < <(resource_args)
  echo "Ray head: ${ip}:${RAY_PORT}   (join with: $0 worker ${ip}:${RAY_PORT})"
  echo "Dashboard / job server: http://${RAY_DASHBOARD_HOST}:${RAY_DASHBOARD_PORT}"
  exec "${RAY_BIN}" start --head --node-ip-address="${ip}" --port="${RAY_PORT}" \
    --dashboard-host="${RAY_DASHBOARD_HOST}" --dashboard-port="${RAY_DASHBOARD_PORT}" \
    ${res[@]+"${res[@]}"} "$@"
}

cmd_worker() {
  need_ray
  [[ $# -ge 1 ]] || die "worker needs the head address, e.g.: $0 worker 10.0.0.1:${RAY_PORT}"
  local addr="$1"; shift
  [[ "${addr}" =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "head address must look like HOST:PORT, got '${addr}'"
  local res=()
  mapfile -t res < <(resource_args)
  exec "${RAY_BIN}" start --address="${addr}" ${res[@]+"${res[@]}"} "$@"
}

# Runtime env for the job, written as JSON (valid YAML) by Python so that quoting is always right.
write_runtime_env() {
  local out="$1"
  ERC_WORKING_DIR="${REPO_ROOT}" "${PYTHON_BIN}" - "${out}" <<'PY'
import glob, json, os, re, sys
root = os.environ["ERC_WORKING_DIR"]
env_vars = {"VERL_USE_EXTERNAL_MODULES": os.environ["ERC_PLUGIN_MODULES"], "PYTHONUNBUFFERED": "1"}
# Forward the listed variables and every ${VAR:-default} knob the recipes read, when set here.
names = set(os.environ.get("ERC_FORWARD_ENV", "").split())
for path in glob.glob(os.path.join(root, "recipe", "*.sh")):
    with open(path) as f:
        names.update(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):-", f.read()))
for name in sorted(names):
    if os.environ.get(name):
        env_vars[name] = os.environ[name]
runtime_env = {
    "working_dir": root,
    "excludes": os.environ.get("ERC_RAY_EXCLUDES", "").split(),
    "env_vars": env_vars,
}
pip = os.environ.get("ERC_RAY_PIP", "").split()
if pip:
    runtime_env["pip"] = pip
with open(sys.argv[1], "w") as f:
    json.dump(runtime_env, f, indent=2)
PY
}

cmd_submit() {
  need_ray
  [[ $# -ge 1 ]] || die "submit needs a recipe, e.g.: $0 submit recipe/<recipe>.sh [hydra overrides...]"
  local recipe="$1"; shift
  [[ -f "${recipe}" ]] || die "recipe not found: ${recipe}"
  local abs rel
  abs="$(cd "$(dirname "${recipe}")" && pwd)/$(basename "${recipe}")"
  case "${abs}" in
    "${REPO_ROOT}"/*) rel="${abs#"${REPO_ROOT}"/}" ;;
    *) die "recipe must live inside this repo (${REPO_ROOT}) so it is shipped with the job: ${recipe}" ;;
  esac
  local address="${RAY_JOB_ADDRESS:-http://127.0.0.1:${RAY_DASHBOARD_PORT}}"
  ENV_FILE="$(mktemp "${TMPDIR:-/tmp}/erc_runtime_env.XXXXXX")"
  trap 'rm -f "${ENV_FILE}"' EXIT
  chmod 600 "${ENV_FILE}"
  ERC_PLUGIN_MODULES="${ERC_PLUGIN_MODULES}" ERC_FORWARD_ENV="${ERC_FORWARD_ENV}" \
    ERC_RAY_EXCLUDES="${ERC_RAY_EXCLUDES}" ERC_RAY_PIP="${ERC_RAY_PIP}" write_runtime_env "${ENV_FILE}"
  local wait_args=()
  if [[ "${RAY_JOB_NO_WAIT}" == "1" ]]; then wait_args=(--no-wait); fi
  local var
  for var in DATA_DIR CKPT_DIR; do
    if [[ "${!var:-}" != /* ]]; then
      echo "warning: ${var}='${!var:-}' is not an absolute path; the job runs in an uploaded copy of the repo" \
        "without data/checkpoints, so point ${var} at storage every node sees" >&2
    fi
  done
  use_token_if_present
  echo "Submitting ${rel} to ${address} (working_dir=${REPO_ROOT})"
  cd "${REPO_ROOT}"
  "${RAY_BIN}" job submit --address="${address}" --runtime-env="${ENV_FILE}" ${wait_args[@]+"${wait_args[@]}"} \
    -- bash "${rel}" "$@"
}

main() {
  [[ $# -ge 1 ]] || { usage >&2; exit 2; }
  local cmd="$1"; shift
  case "${cmd}" in
    -h|--help|help) usage ;;
    head) cmd_head "$@" ;;
    worker) cmd_worker "$@" ;;
    submit) cmd_submit "$@" ;;
    status) need_ray; use_token_if_present; exec "${RAY_BIN}" status "$@" ;;
    stop) need_ray; exec "${RAY_BIN}" stop "$@" ;;
    *) echo "error: unknown command '${cmd}'" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
