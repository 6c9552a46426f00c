#!/usr/bin/env bash
# One prepared GPU check, for a session that is lent a device machine: the CUDA tests of
# the checkout and the CUDA variants of the chain and CRF benchmarks, in one run.
#
# Usage, from the repository root of the device machine:
#     bash benchmarks/device_check.sh [OUTDIR]          (default OUTDIR: $OUT or /tmp/device_check)
# Wheels that the device machine lacks (ortools, immutabledict, protobuf, torch-struct,
# pytorch-crf, hypothesis, ...) can be carried in .whl/ (git-ignored): they are installed
# with --no-deps into /tmp/site, so the machine's CUDA torch is kept.
# Environment: PY (python), TTEST / TBENCH (time limits in s), QUICK=--quick (smoke run),
# DEVICE=cpu (a dry run of this script on a machine without CUDA).
set -uo pipefail
OUTDIR=$(realpath -m "${1:-${OUT:-/tmp/device_check}}")
mkdir -p "$OUTDIR"
PY=${PY:-python3}
SITE=""
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && SITE=/tmp/site
fi
# structgrad.solvers lives in ./solvers (package-dir): run from a copy laid out as
# installed (the checkout's own structgrad/ would shadow it from the working directory)
LAYOUT=/tmp/structgrad_layout
rm -rf "$LAYOUT" && mkdir -p "$LAYOUT" || exit 1
cp -r structgrad tests benchmarks examples docs pyproject.toml README.md "$LAYOUT/" && cp -r solvers "$LAYOUT/structgrad/solvers" || exit 1
cd "$LAYOUT" || exit 1
export PYTHONPATH="$LAYOUT${SITE:+:$SITE}" PYTHONUNBUFFERED=1
$PY -c "import torch, structgrad; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available() and torch.cuda.get_device_name(), '| structgrad from', structgrad.__file__)" \
    | tee "$OUTDIR/env.txt"
# every test with 'cuda' in its name (they skip without a GPU); modules whose imports are
# missing on the machine are reported, not fatal
timeout "${TTEST:-240}" $PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors -k cuda tests -rs 2>&1 \
    | tail -25 | tee "$OUTDIR/tests.txt"
timeout "${TBENCH:-300}" $PY -m benchmarks --device "${DEVICE:-cuda}" --only chain crf ${QUICK:-} 2>&1 | tee "$OUTDIR/bench.txt"
cp benchmarks/out/results.md benchmarks/out/results.json benchmarks/out/ratios.png "$OUTDIR/" 2>/dev/null
echo "wrote $OUTDIR"
