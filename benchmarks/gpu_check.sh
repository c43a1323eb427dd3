#!/usr/bin/env bash
# The one command for a GPU machine, run from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# Installs flaxauto (no dependencies: the machine has jax, flax, optax, torch, transformers),
# prints versions and the GPU, runs the conformance suite's bf16 and fused-attention tiers on the
# GPU (pytest -k "bf16 or fused" over tests/test_conformance.py and tests/test_attention.py
# where it exists), then the GPU benchmarks (gpu.py, then encoder.py and decode.py --quick).
# Every stage has its own timeout and a failing stage does not stop the next; the whole run
# ends within GPU_CHECK_SECONDS (default 530). Output: $OUT/log.txt (everything),
# $OUT/gpu.md (stages, versions and the tables), $OUT/tests.txt (pytest's output).
#
# Knobs (environment): OUT (default benchmarks/results/gpu_check), PYTHON (default python3),
# GPU_CHECK_PLATFORM (JAX_PLATFORMS, default cuda), GPU_CHECK_SECONDS, GPU_CHECK_STAGES (default
# "install versions tests gpu encoder decode"; a CPU check of this script leaves some out),
# GPU_CHECK_TEST_SECONDS (the tests stage's limit, default 150), GPU_CHECK_TEST_WORKERS (pytest-xdist
# workers sharing the GPU, default 1: no xdist), GPU_CHECK_SECTIONS (gpu.py's sections, default all),
# GPU_CHECK_GPU_SECONDS (the gpu stage's limit, default 270), GPU_CHECK_TEST_FILTER (a pytest -k
# expression the tiers' tests must also match, e.g. "detr or yolos").
set -uo pipefail

OUT=${OUT:-$PWD/benchmarks/results/gpu_check}
PYTHON=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_SECONDS:-530}
STAGES=${GPU_CHECK_STAGES:-install versions tests gpu encoder decode}
mkdir -p "$OUT"
RESULTS=$PWD/benchmarks/results

# tests/conftest.py only setdefault()s JAX_PLATFORMS=cpu and an XLA_FLAGS forcing 8 host devices,
# so values exported here win: the GPU platform, and XLA_FLAGS present (possibly empty) without
# the host-device flag.
export JAX_PLATFORMS=${GPU_CHECK_PLATFORM:-cuda}
XLA_FLAGS=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
export XLA_FLAGS
export XLA_PYTHON_CLIENT_PREALLOCATE=false # PyTorch shares the GPU in the benchmarks
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error

START=$SECONDS
STATUS=()

left() { echo $((DEADLINE - (SECONDS - START))); }

# cap N: N seconds, or fewer if the deadline is nearer (5 s kept for the summary)
cap() {
  local remaining
  remaining=$(($(left) - 5))
  if (($1 < remaining)); then echo "$1"; else echo "$remaining"; fi
}

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

# stage NAME SECONDS COMMAND...: COMMAND under a timeout (then SIGKILL 10 s later), its status
# and duration logged; it never stops the script.
stage() {
  local name=$1 limit=$2 t0=$SECONDS rc what
  shift 2
  if ! wanted "$name"; then
    return
  fi
  if ((limit < 10)); then
    echo "== $name: skipped, the deadline is near"
    STATUS+=("$name: skipped (deadline)")
    return
  fi
  echo "== $name (timeout ${limit} s): $*"
  timeout -k 10 "$limit" "$@"
  rc=$?
  what="exit $rc"
  if ((rc == 124 || rc == 137)); then what="timed out"; fi
  if [[ $name == tests ]] && ((rc == 5)); then what="exit 5: no test matched"; fi
  echo "== $name: $what after $((SECONDS - t0)) s"
  STATUS+=("$name: $what after $((SECONDS - t0)) s")
}

versions() {
  # -P: never import the source tree's flaxauto/ (its heads and converters live elsewhere)
  "$PYTHON" -P - <<'EOF'
import importlib.metadata as metadata
import sys

print("python", sys.version.split()[0], sys.executable)
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "torch",
             "transformers", "safetensors", "numpy", "flaxauto"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
import jax

print("jax backend", jax.default_backend(), "devices", jax.devices())
import torch

cuda = torch.cuda.is_available()
print("torch cuda", cuda, torch.version.cuda, torch.cuda.get_device_name() if cuda else "")
import flaxauto
import flaxauto.heads  # noqa: F401

print("flaxauto from", flaxauto.__file__)
EOF
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
      --format=csv
  else
    echo "nvidia-smi: not found"
  fi
}

conformance_tiers() {
  # the bf16 tier is in the conformance suite; the fused-attention tests are there or in
  # test_attention.py (the attention branch's), whichever exist
  local files=(tests/test_conformance.py)
  if [[ -f tests/test_attention.py ]]; then files+=(tests/test_attention.py); fi
  # JAX's default fp32 matmuls may be TF32 on NVIDIA GPUs (~1e-3 relative): the fp32 tolerances
  # were set for IEEE fp32, as PyTorch's reference computes, so these tests ask for it
  local workers=(-p no:xdist)
  if ((${GPU_CHECK_TEST_WORKERS:-1} > 1)); then workers=(-n "$GPU_CHECK_TEST_WORKERS"); fi
  local only="bf16 or fused"
  if [[ -n ${GPU_CHECK_TEST_FILTER:-} ]]; then only="($only) and ($GPU_CHECK_TEST_FILTER)"; fi
  JAX_DEFAULT_MATMUL_PRECISION=highest "$PYTHON" -P -m pytest "${files[@]}" \
    -k "$only" "${workers[@]}" -p no:cacheprovider -q -rfE 2>&1 | tee "$OUT/tests.txt"
  return "${PIPESTATUS[0]}"
}

summary() {
  echo "# flaxauto GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - START)) s"
  echo
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
  grep -E '^(python|jax|jaxlib|flax|optax|torch|transformers) ' "$OUT/log.txt" | sed 's/^/    /'
  echo
  echo "## Stages"
  printf -- '- %s\n' "${STATUS[@]}"
  for name in gpu encoder decode; do
    if wanted "$name" && [[ -f $RESULTS/$name.md ]]; then
      echo
      echo "## benchmarks/$name.py"
      echo
      cat "$RESULTS/$name.md"
    fi
  done
  if [[ -f $OUT/tests.txt ]]; then
    echo
    echo "## Conformance: bf16 and fused tiers (pytest -k 'bf16 or fused'; $OUT/tests.txt)"
    echo
    grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' \
      "$OUT/tests.txt" | tail -40 | sed 's/^/    /'
  fi
}

main() {
  echo "== gpu_check: stages '$STAGES', deadline ${DEADLINE} s, OUT=$OUT"
  rm -f "$RESULTS/gpu.md" "$RESULTS/encoder.md" "$RESULTS/decode.md" # no stale tables
  export -f conformance_tiers
  export PYTHON OUT
  stage install "$(cap 90)" "$PYTHON" -m pip install -q --no-deps --no-build-isolation \
    --root-user-action=ignore .
  export -f versions
  stage versions "$(cap 60)" bash -c versions
  stage tests "$(cap ${GPU_CHECK_TEST_SECONDS:-150})" bash -c conformance_tiers
  local limit
  limit=$(cap ${GPU_CHECK_GPU_SECONDS:-270})
  # gpu.py starts no section later than its budget: imports and one section's overrun fit after
  local sections=()
  if [[ -n ${GPU_CHECK_SECTIONS:-} ]]; then read -ra sections <<<"--sections $GPU_CHECK_SECTIONS"; fi
  stage gpu "$limit" "$PYTHON" benchmarks/gpu.py --budget $((limit - 50)) "${sections[@]}"
  stage encoder "$(cap 80)" "$PYTHON" benchmarks/encoder.py --quick
  stage decode "$(cap 120)" "$PYTHON" benchmarks/decode.py --quick
  summary >"$OUT/gpu.md"
  echo
  cat "$OUT/gpu.md"
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
