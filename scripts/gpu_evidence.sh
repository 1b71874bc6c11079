#!/usr/bin/env bash
# GPU evidence kit: the numbers docs/performance.md's "GPU: the kit" table is waiting for, taken in one short run on a
# borrowed GPU machine that has torch and transformers but no verl, no Ray, no vLLM and no network.
#
#   bash scripts/gpu_evidence.sh prepare [WHEEL_DIR]     HERE (registry access): wheels for the GPU into .whl/
#   bash scripts/gpu_evidence.sh run [--device cuda|cpu] [--out DIR] [-- KIT_ARGS [-- BENCH_ARGS]]
#                                                        THERE: install the wheels with --no-deps --target, measure
#     KIT_ARGS: erc_verl.bench.gpu_evidence's (--skip-check, --skip-bench, --dtypes float32); BENCH_ARGS:
#     erc_verl.bench.overhead's (e.g. --reps 3). Other run options: --wheels DIR, --no-install,
#     --site DIR (where the wheels are installed; default $ERC_KIT_SITE, else $TMPDIR/erc_kit_site, TMPDIR /tmp).
#   bash scripts/gpu_evidence.sh size [WHEEL_DIR]        what would travel: wheels + working tree, against 64 MiB
#
# What travels (prepare; sizes printed: 3.5 MB of wheels): erc_verl's own wheel (`pip wheel --no-deps .`) and the pinned
# packages in scripts/gpu_kit/carry.txt -- verl 0.9.1, tensordict and what verl's engine/loss path imports that the
# GPU image (scripts/gpu_kit/gpu_image_packages.txt) lacks -- as CPython 3.12 manylinux x86_64 wheels (the GPU's
# python3 is /opt/torch/.venv/bin/python3, 3.12.3). Sdist-only pins (antlr4-python3-runtime 4.9.3, pure Python) are
# built into wheels here. The working tree travels anyway (the kit's scripts and the Ray stub come with it).
#
# How Ray is avoided: nothing of Ray travels. `import verl` runs `import ray` (verl/protocol.py; also
# verl/single_controller/base/worker.py), so where no `ray` is importable `run` puts scripts/gpu_kit/ray_stub on
# PYTHONPATH: a module `ray` whose every attribute use raises and is logged to $ERC_KIT_RAY_STUB_LOG (only the
# `ray.ObjectRef` type exists, for a dataclass annotation in verl/protocol.py). The evidence fails if the log is not
# empty. verl's optional TransferQueue (`import transfer_queue` in a try/except ImportError, whose import does call
# ray.remote) is not carried. tests/scripts/test_gpu_evidence.py runs `run --device cpu` in an interpreter that sees
# only the GPU image's packages + the carried ones + the stub (no real Ray, verl, TransferQueue on its path).
#
# On the device tool (one command from the checkout that holds this kit; carry [".whl"]; timeout_s 540; not
# measured yet, estimated 4-6 min; KIT_TIMEOUT=450 s stops the measurements and keeps what was done):
#   bash scripts/gpu_evidence.sh run --device cuda --out "$OUT"
# It prints docs/performance.md's GPU table (markdown) and writes into $OUT: evidence.md, evidence.json, check.json,
# overhead.json, run.log.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=scripts/gpu_kit
PY=${PYTHON:-python3}     # the interpreter that runs the kit (on the GPU: plain python3, the one with torch)
PIP=${PIP:-"$PY -m pip"}  # the pip that installs for it (word-split on purpose)
LIMIT_BYTES=$((64 * 1024 * 1024))

size_report() {  # $1 wheel dir: each wheel, the working tree that travels with it, the total against 64 MiB
  local dir=$1 wheels=0 tree
  echo "kit: wheels in $dir"
  for w in "$dir"/*.whl; do
    [[ -e $w ]] || { echo "kit: no wheels in $dir (run: bash scripts/gpu_evidence.sh prepare)" >&2; return 1; }
    printf '  %10d  %s\n' "$(stat -c %s "$w")" "$(basename "$w")"
    wheels=$((wheels + $(stat -c %s "$w")))
  done
  # tracked + untracked-not-ignored files: what the device tool sends besides carried paths
  tree=$(git ls-files -z -c -o --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  printf '  %10d  wheels total\n  %10d  working tree\n  %10d  together (limit %d = 64 MiB)\n' \
    "$wheels" "$tree" $((wheels + tree)) "$LIMIT_BYTES"
  if (( wheels + tree > LIMIT_BYTES )); then echo "kit: over the 64 MiB that can travel" >&2; return 1; fi
}

run_kit() {  # uses device, out, wheels, site, rest
  local start=$SECONDS rc
  if [[ -n $wheels ]]; then
    ls "$wheels"/*.whl > /dev/null \
      || { echo "kit: no wheels in $wheels: run 'prepare' on a machine with pip access" >&2; return 2; }
    $PIP install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "kit: installed $(ls "$wheels"/*.whl | wc -l) wheels into $site ($((SECONDS - start)) s)"
  fi
  if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("ray") is None)'; then
    export PYTHONPATH="$PWD/$KIT/ray_stub${PYTHONPATH:+:$PYTHONPATH}"
    echo "kit: no ray importable: the import-only stub $KIT/ray_stub stands in"
  fi
  export ERC_KIT_RAY_STUB_LOG="$out/.ray_stub_uses" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
  rm -f "$ERC_KIT_RAY_STUB_LOG"
  # from $out, not the checkout: `python -m` puts the working directory first on sys.path, and erc_verl must come
  # from the installed wheel (or the dev venv), as it would for a user
  # KIT_TIMEOUT (s): SIGTERM makes it write what it has and stop, so a slow step cannot cost the whole device run
  (cd "$out" && timeout --signal=TERM --kill-after=30 "${KIT_TIMEOUT:-450}" \
    "$PY" -m erc_verl.bench.gpu_evidence --device "$device" --out "$out" "${rest[@]}") && rc=0 || rc=$?
  rm -f "$ERC_KIT_RAY_STUB_LOG"
  echo "kit: run finished with exit code $rc in $((SECONDS - start)) s"
  return "$rc"
}

case "${1:-}" in
prepare)
  dest=${2:-.whl}
  mkdir -p "$dest"
  rm -f "$dest"/*.whl
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  grep -v '^\s*#' "$KIT/carry.txt" | grep -v 'sdist-only' | sed 's/\s*#.*//' | grep . > "$tmp/binary.txt"
  grep 'sdist-only' "$KIT/carry.txt" | sed 's/\s*#.*//' > "$tmp/sdist.txt" || true
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" -r "$tmp/binary.txt"
  if [[ -s $tmp/sdist.txt ]]; then  # pure-Python sdists: a py3-none-any wheel built here runs there
    "$PY" -m pip wheel -q --no-deps -w "$tmp/built" -r "$tmp/sdist.txt"
    for w in "$tmp"/built/*.whl; do
      [[ $(basename "$w") == *-py3-none-any.whl || $(basename "$w") == *-py2.py3-none-any.whl ]] \
        || { echo "kit: $w is not pure Python" >&2; exit 1; }
      mv "$w" "$dest"/
    done
  fi
  # erc_verl from a clean copy of the working tree's files that git sees (a stale build/ would be packed too), so
  # every package folder pyproject.toml names comes along without a list here to keep in step
  mkdir -p "$tmp/src"
  git ls-files -z -c -o --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$tmp/src"
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$tmp/src"
  size_report "$dest"
  ;;
size)
  size_report "${2:-.whl}"
  ;;
run)
  shift
  device=cuda out=${OUT:-gpu_evidence_out} wheels=.whl site=${ERC_KIT_SITE:-${TMPDIR:-/tmp}/erc_kit_site} rest=()
  while (($#)); do
    case $1 in
      --device) device=$2; shift 2 ;;
      --out) out=$2; shift 2 ;;
      --wheels) wheels=$2; shift 2 ;;     # a folder of wheels to install (default .whl)
      --site) site=$2; shift 2 ;;         # where they go (--target)
      --no-install) wheels=; shift ;;     # use what is importable already (a dev venv, or a prepared site)
      --) shift; rest=("$@"); break ;;
      *) echo "run: unknown argument $1" >&2; exit 2 ;;
    esac
  done
  out=$(mkdir -p "$out" && cd "$out" && pwd)   # absolute: the kit's python runs from $out
  site=$(mkdir -p "$site" && cd "$site" && pwd)
  run_kit 2>&1 | tee "$out/run.log"
  exit "${PIPESTATUS[0]}"
  ;;
*)
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
  ;;
esac
