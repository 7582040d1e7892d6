#!/usr/bin/env bash
# Everything that needs a GPU, for one call of a lent GPU machine (the `device` tool), whose image
# already holds torch, transformers, timm, accelerate, safetensors, sentencepiece and pytest:
#
#   bash benchmarks/gpu_run.sh            # results and logs under $OUT (or ./gpu_results)
#
# 1. the CUDA tests: the CUDA graph decode step and image encoder against the eager path
#    (token-identical greedy and beams, batch 1-32, with and without torch.compile; sampling
#    token-identical without compile, per-step logits within fp16 rounding with it), the
#    one-GPU memory report, and the decoder/generation parity tests on this machine;
# 1b. (STEPS="engine", in the default) the paged serving engine's tests: real CUDA graphs over block
#    tables equal generate(), plus the engine suites (prefix caching, preemption, random load) and the
#    int8 KV cache (CUDA graphs over an int8 pool equal eager int8, fp32 and fp16);
# 2. the decoder benchmark at the InternLM-7B shape in fp16 (ours eager / graph / graph+compiled
#    against transformers' Llama, prefill, decode batch 1/8/32, 5 beams, image question time to
#    first token, image encode batch 1/8 with the real EVA ViT-g, the bandwidth limit).
# 3. (STEPS="bench2") the same benchmark at the internlm2_5-7b-chat shape (grouped-query attention).
# 4. (STEPS="serve") the serving benchmark (benchmarks/bench_serve.py --device cuda) at the
#    internlm2_5-7b-chat shape, fp16: server memory at --session-len 32768 with batch 1 and 16,
#    document chat with prefix caching on/off, head-of-line blocking per prefill budget, engine
#    decode tokens/s at batch 1 and 16 (eager and CUDA graphs) against the bandwidth limit; about
#    4 minutes, results in $OUT/serve.json and serve.txt. SERVE_ARGS passes options to it.
# 5. (STEPS="quant") the 8/4-bit tests on CUDA and benchmarks/bench_quant.py at the 7B shape (fp16, int8,
#    nf4: weight memory, decode tokens/s at batch 1 and 16); QUANT_ARGS passes options to it.
# 6. (STEPS="bench25") the XComposer2.5 image question (benchmarks/bench_xcomposer2d5.py --device cuda) at
#    internlm-xcomposer2d5-7b's shapes, fp16: time to first token of a 4-crop and a 24-crop image (2061 and
#    10101 image tokens), ours against transformers' CLIP + Llama with the Partial LoRA hooked in, same
#    weights (~40 GB: two 8B models); results in $OUT/bench_xcomposer2d5.json. BENCH25_ARGS passes options.
# 7. (STEPS="adapters") served throughput with LoRA adapters (benchmarks/bench_adapters.py --device cuda) at the
#    internlm2_5-7b-chat shape, fp16 random weights, 16 concurrent requests through the engine: base only, all on one
#    adapter, spread over 4 (r=16 on wqkv/wo/w1/w2/w3, ~75 MB each), eager and CUDA graphs, ratios, outputs against
#    generate() alone; ~16 GB, a minute or two; results in $OUT/bench_adapters.json. ADAPTERS_ARGS passes options.
# 8. (STEPS="train") LoRA training (benchmarks/bench_finetune.py --device cuda --mode small: ours against peft on
#    transformers' Llama, tokens/s and peak memory) and packed rows against padded batches (benchmarks/bench_pack.py
#    --device cuda); needs peft, which the image lacks: pip download peft --no-deps -d gpu_wheels first.
# One device call may run 10 minutes at most: STEPS="tests" or STEPS="bench" runs one part, and
# BENCH_ARGS passes options to the benchmark, e.g. BENCH_ARGS="--variants ours ours-graph --repeats 3"
# (the compiled variant compiles once per batch shape: budget a minute or more per shape).
set -uo pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
steps=${STEPS:-"tests engine bench"}
rc=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# the device has no network: wheels it lacks travel in gpu_wheels/ (git-ignored; the device tool's
# `carry`), e.g. pip download bitsandbytes==0.50.2 --no-deps -d gpu_wheels
if compgen -G "gpu_wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-deps gpu_wheels/*.whl 2>&1 | tail -2 | tee -a "$out/gpu.txt"
fi
python3 -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)" | tee -a "$out/gpu.txt"
if [[ " $steps " == *" tests "* ]]; then
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_fast_decode.py tests/test_sharding.py tests/test_decoder.py \
        tests/test_generation.py tests/test_internlm2_decoder.py tests/test_internlm2_parallel.py 2>&1 \
        | tee "$out/tests.txt" || rc=1
fi
if [[ " $steps " == *" engine "* ]]; then  # the paged engine: real CUDA graphs over block tables, STEPS="engine"
    # (the /health test needs the HTTP stack, which the GPU image lacks: it runs in CI)
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_engine_paged.py tests/test_serve_engine.py tests/test_kv_quant.py -k "not health" \
        2>&1 | tee "$out/engine_tests.txt" || rc=1
fi
if [[ " $steps " == *" quant "* ]]; then  # 8/4-bit weights (bitsandbytes, GPTQ / AWQ): tests, then bench_quant
    # at the InternLM2.5-7B shape (fp16 vs int8 vs nf4: memory and decode tokens/s at batch 1 and 16), STEPS="quant"
    python3 -c "import bitsandbytes" 2>/dev/null || echo "bitsandbytes is not installed: carry a wheel" | tee -a "$out/gpu.txt"
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_bnb_quant.py $(ls tests/test_packed_quant.py 2>/dev/null) \
        2>&1 | tee "$out/quant_tests.txt" || rc=1
    python3 benchmarks/bench_quant.py --device cuda --mode 7b --json "$out/quant.json" ${QUANT_ARGS:-} 2>&1 \
        | tee "$out/quant.txt" || rc=1
fi
if [[ " $steps " == *" bench "* ]]; then
    python3 benchmarks/bench_decoder.py --device cuda --mode 7b --json "$out/decoder.json" ${BENCH_ARGS:-} 2>&1 \
        | tee "$out/decoder.txt" || rc=1
fi
if [[ " $steps " == *" bench2 "* ]]; then  # the internlm2_5-7b-chat shape (GQA), STEPS="bench2"
    python3 benchmarks/bench_decoder.py --device cuda --mode 7b --family internlm2 --no-image \
        --json "$out/decoder_internlm2.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/decoder_internlm2.txt" || rc=1
fi
if [[ " $steps " == *" serve "* ]]; then  # the serving benchmark at the internlm2_5-7b-chat shape, STEPS="serve"
    python3 benchmarks/bench_serve.py --device cuda --json "$out/serve.json" ${SERVE_ARGS:-} 2>&1 \
        | tee "$out/serve.txt" || rc=1
fi
if [[ " $steps " == *" bench25 "* ]]; then  # XComposer2.5 image question, 4 and 24 crops, STEPS="bench25"
    python3 benchmarks/bench_xcomposer2d5.py --device cuda --out "$out/bench_xcomposer2d5.json" ${BENCH25_ARGS:-} 2>&1 \
        | tee "$out/bench_xcomposer2d5.txt" || rc=1
fi
if [[ " $steps " == *" adapters "* ]]; then  # served throughput with LoRA adapters, STEPS="adapters"
    python3 benchmarks/bench_adapters.py --device cuda --json "$out/bench_adapters.json" ${ADAPTERS_ARGS:-} 2>&1 \
        | tee "$out/bench_adapters.txt" || rc=1
fi
if [[ " $steps " == *" train "* ]]; then  # LoRA training and packing, STEPS="train" (peft from gpu_wheels/)
    python3 benchmarks/bench_finetune.py --device cuda --mode small --json "$out/bench_finetune.json" 2>&1 \
        | tee "$out/bench_finetune.txt" || rc=1
    python3 benchmarks/bench_pack.py --device cuda --mode small --json "$out/bench_pack.json" 2>&1 \
        | tee "$out/bench_pack.txt" || rc=1
fi
exit $rc
