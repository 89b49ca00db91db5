#!/usr/bin/env bash
# The GPU benchmark in one go, from the repository root of a machine with one
# CUDA GPU: the SD 1.5 architecture with random weights (same compute as the
# real model), 512x512, the plain diffusers loop against the appliance end to
# end, at 25 steps with guidance 7.5 and at 1 step without guidance (the
# turbo-style setting). Each run appends a row to BENCHMARKS.md and writes its
# JSON and log to $RESULTS. Expected to take 6 to 8 minutes on an H100 (an
# estimate: not yet timed there).
#
#   bench/fetch_wheels.sh    # first, where there is internet: wheels into .whl/
#   bench/gpu.sh             # then on the GPU machine (installs .whl/ if present)
#
# Environment (defaults in brackets):
#   PYTHON       the Python with a CUDA build of torch [python3]
#   MODEL        where the SD 1.5-sized model is (made when missing) [models/sd15-random]
#   RESULTS      folder for the JSON files, logs and a copy of BENCHMARKS.md [$OUT, else bench/results]
#   COMPILE      engine.compile for the appliance [off]
#   PEAK_TFLOPS  the GPU's dense fp16/bf16 peak, for the compute fraction [790: H100/H200 SXM]
#   TABLE        the Markdown table to append the rows to [BENCHMARKS.md]
set -eu -o pipefail

main() {
    cd "$(dirname "$0")/.."
    local python="${PYTHON:-python3}" model="${MODEL:-models/sd15-random}"
    local results="${RESULTS:-${OUT:-bench/results}}" compile="${COMPILE:-off}"
    local peak="${PEAK_TFLOPS:-790}" table="${TABLE:-BENCHMARKS.md}"
    mkdir -p "$results"
    if [ -d .whl ]; then
        # The packages the machine's image lacks, beside (not over) its own.
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target .whl/site .whl/*.whl
        export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$python" -c 'import torch, diffusers, litestar; print("torch", torch.__version__, "diffusers", diffusers.__version__, "cuda", torch.cuda.is_available())'
    if [ ! -f "$model/model_index.json" ]; then
        time "$python" -m appliance models synth "$model" --size sd15
    fi

    # Batch sizes: at 25 steps with guidance, 16 images make UNet batches of 32
    # latents, enough to keep an H100 busy while a batch still ends within
    # seconds; at 1 step the text encoder, VAE and per-call costs weigh more, so
    # larger batches pay. PNG threads: random weights make noise, which PNG
    # cannot compress, so encoding is at its slowest (tens of milliseconds a
    # 512x512 image); at 1 step, where images come fastest, 12 of the 16 cores
    # encode. Clients poll every 0.25 s: with 16 cores polling costs the GPU
    # nothing, and the clock, which stops when the last job is seen finished,
    # runs on for less.
    local failed=0
    bench "$python" "$model" "$results" "$table" sd15-512-25steps "$compile" "$peak" \
        --steps 25 --guidance 7.5 --batch-size 16 --vae-decode-chunk 8 --png-threads 8 \
        --images 320 --baseline-images 12 --clients 4 --job-size 16 || failed=1
    bench "$python" "$model" "$results" "$table" sd15-512-1step "$compile" "$peak" \
        --steps 1 --guidance 0 --batch-size 32 --vae-decode-chunk 16 --png-threads 12 \
        --images 2048 --baseline-images 48 --clients 8 --job-size 64 || failed=1
    # Several models: the load (swap) of an SD 1.5-sized model on the GPU, and two
    # such models alternating against one, swapping under a budget for one.
    echo "=== models-sd15"
    "$python" -m appliance bench-models --size sd15 --device cuda --width 512 --steps 25 \
        --batch-size 16 --images 192 --job-size 16 --swap-seconds 5 --loads 3 --rounds 1 \
        --json "$results/models-sd15.json" 2> "$results/models-sd15.log" \
        | tee "$results/models-sd15.txt" || failed=1
    cp "$table" "$results/BENCHMARKS.md"
    return "$failed"
}

# The figures go to the terminal and $results/NAME.txt, the log to $results/NAME.log.
bench() {
    local python="$1" model="$2" results="$3" table="$4" name="$5" compile="$6" peak="$7"
    shift 7
    echo "=== $name"
    if ! "$python" -m appliance bench --model "$model" --device cuda --dtype auto \
            --width 512 --height 512 --batch-window 0.05 --compile "$compile" --poll-seconds 0.25 \
            --peak-tflops "$peak" --json "$results/$name.json" --markdown "$table" "$@" \
            2> "$results/$name.log" | tee "$results/$name.txt"; then
        echo "--- $name failed; the end of its log:"
        tail -n 40 "$results/$name.log"
        return 1
    fi
}

main "$@"
