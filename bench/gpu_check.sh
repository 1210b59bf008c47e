#!/usr/bin/env bash
# litvision's GPU check in one call (docs/benchmarks.md, "GPU check"): fit of both R50-FPN detectors at 800 px
# under bf16-mixed and 16-mixed against a raw torch.autocast loop, validate, compare on CUDA in bf16, a SIGKILL
# and --ckpt_path last, a 2-process DDP fit + validate when 2 GPUs are present; one summary table at the end,
# summary.json / summary.md / logs in $OUT (else runs/gpu_check/TIMESTAMP). About 5 minutes on one H100.
#
#   bench/gpu_check.sh              # the full check (8-minute budget)
#   bench/gpu_check.sh --quick      # half the steps and images
#   bench/gpu_check.sh --dry-run    # the same commands on the CPU at a tiny scale
#   bench/gpu_check.sh --plan       # print the commands, run nothing
#   bench/gpu_check.sh --help       # every option
#
# Python: $LITVISION_PYTHON if set, else .venv/bin/python, made by `make install` when missing. Nothing is
# downloaded at run time (generated data, no pretrained weights). Exit status 1 when a check failed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${LITVISION_PYTHON:-}" ]]; then
    PY=$LITVISION_PYTHON
else
    if [[ ! -x .venv/bin/python ]]; then
        if python3 -c 'import torch, torchvision, lightning' 2>/dev/null; then
            # A machine image with the dependencies and maybe no network: the venv sees them, and pip installs
            # only the project, without fetching build tools (PIP_NO_BUILD_ISOLATION=0 means "no isolation").
            python3 -m venv --system-site-packages .venv
            export PIP_NO_BUILD_ISOLATION=0
        fi
        echo "gpu_check: no .venv/bin/python: make install" >&2
        if ! make install >&2; then
            echo "gpu_check: make install failed; running from the source tree (PYTHONPATH) if .venv can import" \
                 "the dependencies, else set LITVISION_PYTHON to a Python that can" >&2
        fi
    fi
    PY=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m bench.gpu_check "$@"
