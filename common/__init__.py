"""Contracts shared by the cotprune stages, one module per concern; import what you need from the module by name.

    cli          one-line errors, argparse with parse-time number checks, run_cli
    files        JSONL in and out, atomic writes, strict JSON, resumable output (JsonlAppender)
    runtime      device, dtype (bfloat16 only where native), seed, memory, parameter counts
    models       loading a model or tokenizer: hub id, folder (safetensors only), .gguf, embedded
    layers       decoder blocks, the layer-capture idiom, running one block, Gram matrices
    checkpoints  self-describing safetensors, safe output folders, weight fingerprints
    chat         the one chat format of evaluation, calibration and recovery
    mathtext     reading arithmetic in model-written math: LaTeX, '=' claims, stated numbers (linear time)
    engine       the generation engine (continuous batching, static decode, packed linears)
    kvcache      the KV caches it writes in place (transformers' cache protocol)
    attention    the attention functions it registers with transformers (slot by slot, batched matmuls)
    decodestep   its decode step for Llama-family layers, written out as their tensor operations
    stats        intervals and paired tests (numpy only)
    reports      what the study reports share: records in, estimates with intervals, paired comparisons, markdown
    studies      the RAC and neuron study reports (correlate.py --study rac | neurons)
    sandbox      running model-written code with limits, for HumanEval

Nothing here is a pruning or scoring algorithm. A stage plus this folder can be copied into another project.
"""
