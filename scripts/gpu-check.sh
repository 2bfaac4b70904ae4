#!/usr/bin/env bash
# GPU check: kvconnect's GPU paths byte for byte, on one CUDA machine with no network, in about
# 8 minutes; exits non-zero on any failure (no CUDA device, a missing package, a skipped or failed
# device test, a failed or unverified benchmark).
#
#   1. gpu tests (tests/gpu, marker gpu): P/D over real NIXL between two processes, VRAM to VRAM
#      and VRAM to host (NHD, HND, MLA; block-size mismatches, TP splits, pull and push); the CUDA
#      offload copier (random blocks, a load racing an eviction); integrity sums on the GPU equal
#      to the CPU's. Every one must run: a skip fails the check.
#   2. `kvconnect bench` (offload and transfer on the GPU, random KV, every byte verified after
#      the timed runs), writing docs/BENCHMARKS-GPU.md.
#
# The machine needs Python 3.12 with CUDA torch (the image's python3 has it), pytest, numpy, and
# kvconnect's other packages. Where they are missing and nothing can be downloaded, bring wheels in
# .whl/ (about 57 MiB; in .git/info/exclude: `echo /.whl/ >> .git/info/exclude`), downloaded on
# a machine with network from the repository root with:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     nixl-cu13==1.5.1 nixl==1.5.1 msgspec==0.23.0 pyzmq==27.3.0 xxhash==3.5.0
#
# nixl-cu13 matches a CUDA 13 torch (use nixl-cu12 for a CUDA 12 one); `nixl` is the meta package
# that picks the build matching torch's CUDA. This script installs .whl/*.whl (no index, no deps)
# into a private folder and puts it on PYTHONPATH.
#
# Usage (repository root): bash scripts/gpu-check.sh [output folder, default $OUT or /tmp/kvc-gpu-check]
# Environment: PYTHON (default python3), GPU_CHECK_TEST_S / GPU_CHECK_BENCH_S (time limits, s).
# GPU_CHECK_REHEARSE=1 runs the same steps on the CPU (host variants of the tests, small CPU
# benchmarks, report to the output folder) to try the script itself; it exits 3 when all that
# passed (1 when not): a rehearsal is never a GPU check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${1:-${OUT:-/tmp/kvc-gpu-check}}
REHEARSE=${GPU_CHECK_REHEARSE:-0}
mkdir -p "$OUTDIR"
fail() { echo "gpu-check: FAILED: $1" >&2; exit "${2:-1}"; }
if [ "$REHEARSE" = 1 ]; then
    echo "gpu-check: REHEARSAL on the CPU: host variants and CPU benchmarks; not a GPU check" >&2
    MARK="not gpu" DEV=cpu REPORT="$OUTDIR/BENCHMARKS-REHEARSAL.md"
    SIZES=(--offload-args "--device cpu --quick --block-sizes 16 --copy-threads 1 --lookup-stored 1000"
           --transfer-args "--device cpu --layers 4 --blocks 40 --request-blocks 8 --batch 4 --iters 3")
else
    MARK="gpu" DEV=cuda REPORT=docs/BENCHMARKS-GPU.md
    SIZES=(--offload-args "--device cuda --gb 1 --repeats 3 --lookup-stored 1000 10000"
           --transfer-args "--device cuda --iters 7")
fi

# -- 0. a CUDA device, or a clear failure ---------------------------------------------------
if [ "$REHEARSE" != 1 ] && ! "$PY" - <<'EOF'
import sys
try:
    import torch
except Exception as e:
    sys.exit(f"gpu-check: torch does not import ({type(e).__name__}: {e})")
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) "
             "sees none (nvidia-smi? CUDA_VISIBLE_DEVICES?)")
print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
then
    fail "this check needs a CUDA device" 2
fi

# -- 1. packages: carried wheels, then an import check ----------------------------------------
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    site=/tmp/kvc-gpu-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || fail "installing the wheels in .whl/"
    export PYTHONPATH="$PYTHONPATH:$site"
fi
# NIXL's UCX CUDA modules link libcudart of torch's CUDA major: let the loader find torch's copy.
cudalib=$("$PY" -c 'import glob, os, site, sys
dirs = [p for s in site.getsitepackages() + sys.path for p in glob.glob(os.path.join(s, "nvidia", "*", "lib"))
        + glob.glob(os.path.join(s, "nvidia", "cu*", "lib"))]
print(":".join(sorted(set(dirs))))' 2>/dev/null)
export LD_LIBRARY_PATH="${cudalib:+$cudalib:}${LD_LIBRARY_PATH:-}"
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo} UCX_LOG_LEVEL=${UCX_LOG_LEVEL:-error} NIXL_LOG_LEVEL=${NIXL_LOG_LEVEL:-WARN}
"$PY" -c 'import msgspec, zmq, numpy, pytest, kvconnect
from kvconnect.backends.nixl import load_nixl
agent, _ = load_nixl()
print("gpu-check: NIXL from", agent.__module__)' || fail "kvconnect's packages do not import (see above; bring .whl/, header)"

status=0
# -- 2. gpu tests: every selected test must run and pass --------------------------------------
echo "gpu-check: gpu tests ..." >&2
# CI / KVCONNECT_REQUIRE_ALL would demand vLLM and SGLang, which this machine cannot have; the
# skip check below is this script's own strictness.
timeout "${GPU_CHECK_TEST_S:-270}" env -u CI -u KVCONNECT_REQUIRE_ALL "$PY" -m pytest -p no:cacheprovider -q -rs -m "$MARK" \
    tests/gpu/test_nixl_pd_devices.py tests/gpu/test_offload_gpu.py tests/gpu/test_integrity_gpu.py \
    tests/gpu/test_mooncake_staging_gpu.py \
    --junitxml "$OUTDIR/gpu-tests.xml" 2>&1 | tee "$OUTDIR/gpu-tests.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "gpu-check: FAILED: gpu tests exited $rc$([ "$rc" -eq 124 ] && echo ' (time limit)')" >&2
    status=1
elif ! "$PY" - "$OUTDIR/gpu-tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
suite = next(ET.parse(sys.argv[1]).getroot().iter("testsuite"))
ran, skipped = int(suite.get("tests")), int(suite.get("skipped"))
if ran == 0 or skipped:
    sys.exit(f"gpu-check: {skipped} of {ran} tests were skipped: every one must run here")
print(f"gpu-check: {ran} tests ran and passed")
EOF
then
    status=1
fi

# -- 3. benchmarks on the GPU, verified, written to docs/BENCHMARKS-GPU.md ---------------------
echo "gpu-check: benchmarks ..." >&2
timeout "${GPU_CHECK_BENCH_S:-210}" "$PY" -m kvconnect.bench.report --no-e2e --only offload transfer "${SIZES[@]}" \
    --out "$REPORT" --json-out "$OUTDIR/gpu-bench.json" --timeout 100 2>&1 | tee "$OUTDIR/gpu-bench.log"
rc=${PIPESTATUS[0]}
cp -f "$REPORT" "$OUTDIR/" 2>/dev/null
if [ "$rc" -ne 0 ]; then
    echo "gpu-check: FAILED: benchmarks exited $rc$([ "$rc" -eq 124 ] && echo ' (time limit)') (see $OUTDIR/gpu-bench.log)" >&2
    status=1
elif ! "$PY" - "$OUTDIR/gpu-bench.json" "$DEV" <<'EOF'
import json, sys
res = json.load(open(sys.argv[1]))["results"]
want_gpu = sys.argv[2] == "cuda"
for name in ("offload", "transfer"):
    r = res[name]["result"]
    ver = r.get("verified_bytes", 0) if name == "transfer" else sum(x.get("verified_bytes", 0) for x in r["rows"])
    dev = r.get("device", "")
    on_gpu = dev == "cuda" or "<-> pinned host" in dev
    if not ver or on_gpu != want_gpu:
        sys.exit(f"gpu-check: the {name} benchmark did not verify its bytes on the {sys.argv[2]} device "
                 f"(device {dev!r}, {ver} bytes verified)")
    print(f"gpu-check: {name}: {ver / 2**20:.0f} MiB verified on {dev}")
EOF
then
    status=1
fi

if [ "$REHEARSE" = 1 ]; then
    [ "$status" -eq 0 ] || exit 1
    echo "gpu-check: REHEARSAL passed on the CPU (logs: $OUTDIR); exit 3: it is not a GPU check" >&2
    exit 3
fi
[ "$status" -eq 0 ] && echo "gpu-check: PASSED (report: $REPORT, logs: $OUTDIR)" >&2
exit "$status"
