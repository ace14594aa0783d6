#!/usr/bin/env bash
# The checks that need a GPU, in one go (CI has none): the whole test suite with CUDA visible, so that the
# CUDA-only tests run (every method's CPU/CUDA agreement through training, the HotSketch on both, TT's
# cache); the demo trained end to end on CUDA; cafe against hash training speed on CUDA at Kaggle's
# cardinalities; HotSketch throughput on CUDA; a cafe step without host syncs (HotSketch.insert_masked)
# against the vectorised one, captured in a CUDA graph and compiled with fullgraph=True
# (benchmarks/cafe_sync_free.py: each attempt prints its error rather than stopping). Run from the
# repository root:
#
#     bash benchmarks/cuda_check.sh [OUT_DIR]        # a few minutes on one H100
#
# Uses the python3 on the PATH (PYTHON=... for another) with the repository on PYTHONPATH, so it needs
# only torch, numpy, scikit-learn, tqdm, pytest, pytest-xdist and hypothesis installed.
set -uo pipefail
out=${1:-bench-out/cuda-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
status=0
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$out/env.txt" || exit 1
$py -m pytest -q -n 8 -rs tests 2>&1 | tee "$out/pytest.log" | tail -25 || status=1
$py -m embcompress demo --device cuda --no-progress --methods full,hash,qr,cafe,cafe-ml,tt,lowrank,mpcache \
    2>&1 | tee "$out/demo.log" | tail -15 || status=1
{
    for ratio in 1000 10000; do
        $py benchmarks/cafe_speed.py --device cuda --scale 1 --rows 300000 --batch-size 4096 --ratio $ratio --blocks 10
    done
    $py benchmarks/hotsketch.py --device cuda --skip-recall --threads 1 --exponents 1.1 --stream 10000000
    $py benchmarks/cafe_profile.py --device cuda
    $py benchmarks/cafe_sync_free.py --device cuda --scale 1 --batch-size 4096 --ratio 1000 --blocks 5 --compile
} 2>>"$out/bench.log" | tee "$out/bench.jsonl" || status=1
exit $status
