#!/usr/bin/env bash
# Everything factorlab checks on a CUDA GPU, in one prepared run of under 8 minutes (a lent GPU gives
# about 15 minutes in all): the CUDA-only tests, then the injection cell's speed on the card in float32
# and bfloat16, alone and with 8 cells sharing it, then 20 grid cells alone against packed (whatever
# time is left). Needs the python3 on PATH with torch (CUDA) and this
# checkout's dependencies; SmolLM2 where it is installed (tools/gpu_inject_grid.sh assembles it on a
# machine without PyPI), the tiny backend otherwise.
#
#   tools/gpu_check.sh OUT_DIR [MODEL]         # MODEL: smollm2 (default when available) or tiny
#
# OUT_DIR gets log.txt (everything printed), nvidia-smi.txt and bench-*.txt; copy the numbers into
# BENCHMARKS.md with this command line.
set -uo pipefail
out=${1:?usage: tools/gpu_check.sh OUT_DIR [MODEL]}
model=${2:-$(python3 -c "from factorlab.models import smollm2_available as a; print('tiny' if a() else 'smollm2')" 2>/dev/null || echo tiny)}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/tests:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
exec > >(tee -a "$out/log.txt") 2>&1
deadline=$(($(date +%s) + 460))
left() { echo $((deadline - $(date +%s))); }

echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

echo "== CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_precision.py \
    -k "cuda or gpu or device or never_waits" 2>&1 | tail -15

for dtype in float32 bfloat16; do
    for cells in 1 8; do
        budget=$(left)
        [ "$budget" -gt 40 ] || { echo "== out of time before $dtype x $cells"; break 2; }
        echo "== $model lora $dtype, $cells cell(s) sharing the GPU"
        timeout "$budget" python3 bench/inject_cell_speed.py --device cuda --model "$model" --method lora \
            --dtype "$dtype" --cells "$cells" --steps 30 2>&1 | grep -v Warning | tee "$out/bench-$dtype-$cells.txt" | tail -3
    done
done
# Packed grid cells on the card (issue 32): the same 20 LoRA cells (5 relations x 2 seeds x ranks 4, 8) of
# the $model backend, one worker, every cell alone (--pack 1) and as one pack (--pack 20), each from an
# empty folder; wall times compared.
for pack in 1 20; do
    budget=$(left)
    [ "$budget" -gt 60 ] || { echo "== out of time before the packed grid (pack $pack)"; break; }
    echo "== $model grid of 20 LoRA cells (2 epochs) on the GPU, --pack $pack"
    rm -rf "/tmp/pack-grid-$pack"
    start=$(date +%s)
    timeout "$budget" python3 -m factorlab inject grid --model "$model" --methods lora --r 4 --rank-sweep 8 \
        --seeds 0,1 --epochs 2 --workers 1 --device cuda --pack "$pack" --out "/tmp/pack-grid-$pack" \
        >"$out/pack-grid-$pack.txt" 2>&1
    echo "pack $pack: exit $? after $(($(date +%s) - start)) s, $(ls /tmp/pack-grid-$pack/cells/*/summary.json 2>/dev/null | wc -l) cells" | tee -a "$out/pack-grid.txt"
done
echo "== done $(date -u +%FT%TZ), $(left) s to spare"
