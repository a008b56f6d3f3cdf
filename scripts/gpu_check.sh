#!/usr/bin/env bash
# One command that checks nanoMoA on a CUDA GPU, for a user or a machine that has one:
#
#     bash scripts/gpu_check.sh        # a few minutes; prints PASS or FAIL per check, logs in out/gpu_check/logs/
#
# Every script once on cuda, on tiny sizes, in float32 (TF32) and in bfloat16: data/prepare.py, train_base.py,
# train_lora.py (an expert per task), train_router.py (MoA, then adding the held-back task), sample.py, results.py;
# then train_base.py and train_router.py with --compile, both under torchrun on every visible GPU, the test suite
# (its cuda tests run here too), and bench.py (bfloat16, with --compile; its table is in logs/bench.log).
# Exits 1 if any check failed. GPU_CHECK_DEVICE=cpu rehearses the script itself on a machine without a GPU.
set -u
cd "$(dirname "$0")/.."
DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUT=out/gpu_check
if [ "$DEVICE" = cuda ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "error: torch sees no CUDA GPU here (a CPU-only torch, no driver, or no GPU): this check needs one" >&2
    exit 1
fi
GPUS=$(python -c "import torch; print(torch.cuda.device_count() if '$DEVICE' == 'cuda' else 2)")
rm -rf "$OUT" && mkdir -p "$OUT/logs"
failed=0

check() {  # check NAME COMMAND...: runs COMMAND, its output in $OUT/logs/NAME.log; prints PASS or FAIL, NAME, seconds
    local name=$1 log="$OUT/logs/${1// /_}.log" t0=$SECONDS
    shift
    if "$@" > "$log" 2>&1; then
        printf "PASS  %-34s %4ds\n" "$name" $((SECONDS - t0))
    else
        printf "FAIL  %-34s %4ds  see %s\n" "$name" $((SECONDS - t0)) "$log"
        failed=1
    fi
}

python -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}:',
    ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or 'no GPU')"
DATA=$OUT/data
check prepare python data/prepare.py --out_dir=$DATA --max_tokens=50000 --records=4000 --val_records=64
META="import json; meta = json.load(open('$DATA/meta.json'))"
TASKS=$(python -c "$META; print(*[t for t in meta['tasks'] if t not in meta['held_back']])")  # the experts MoA routes
ADDED=$(python -c "$META; print(*meta['held_back'][:1])")  # the task added later
TINY="--data_dir=$DATA --device=$DEVICE --progress=False --eval_iters=1 --batch_size=32"
MODEL="--n_layer=2 --n_head=2 --n_embd=64 --block_size=128"

for dtype in float32 bfloat16; do
    run=$OUT/$dtype  # laid out as demo.py lays out out/, so that results.py reads it
    experts=$run/runs/seed1/experts bundles=$run/runs/seed1/moa
    args="$TINY --dtype=$dtype --max_iters=40 --eval_interval=20"
    check "train_base $dtype" python train_base.py $args $MODEL --out_dir=$run/base --max_iters=200 --eval_interval=100
    for task in $TASKS $ADDED; do
        check "train_lora $task $dtype" python train_lora.py $args --base=$run/base --out_dir=$experts --domain=$task
    done
    check "train_router $dtype" python train_router.py $args --base=$run/base --experts=$experts --out_dir=$bundles
    check "train_router add $dtype" python train_router.py $args --base=$run/base --experts=$experts \
        --out_dir=$bundles --add_domain=$ADDED --bundle=$bundles/moa.safetensors
    check "sample $dtype" python sample.py --device=$DEVICE --base=$run/base --bundle=$bundles/moa+$ADDED.safetensors \
        --prompt="12+34=||Reverse the word: spam" --max_new_tokens=20
    check "results $dtype" python results.py --device=$DEVICE --out=$run --data_dir=$DATA --records=32 --plots=False
done

run=$OUT/bfloat16
check "train_base --compile" python train_base.py $TINY $MODEL --dtype=bfloat16 --compile --out_dir=$OUT/compiled \
    --max_iters=100 --eval_interval=50
check "train_router --compile" python train_router.py $TINY --dtype=bfloat16 --compile --base=$run/base \
    --experts=$run/runs/seed1/experts --out_dir=$OUT/compiled --max_iters=40 --eval_interval=20
check "torchrun x$GPUS train_base" python -m torch.distributed.run --standalone --nproc_per_node=$GPUS train_base.py \
    $TINY $MODEL --dtype=bfloat16 --out_dir=$OUT/torchrun/base --max_iters=100 --eval_interval=50
check "torchrun x$GPUS train_router" python -m torch.distributed.run --standalone --nproc_per_node=$GPUS \
    train_router.py $TINY --dtype=bfloat16 --lora_dropout=0.1 --base=$run/base --experts=$run/runs/seed1/experts \
    --out_dir=$OUT/torchrun/moa --max_iters=40 --eval_interval=20
check "test suite" python -m pytest -q tests
check bench python bench.py --device=$DEVICE --dtype=bfloat16 --compile --out_dir=$OUT/bench \
    $([ "$DEVICE" = cuda ] || echo --quick)

[ $failed = 0 ] && echo "all checks passed" || echo "some checks FAILED"
exit $failed
