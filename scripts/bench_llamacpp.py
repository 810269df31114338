"""The peer for `wake2vec bench generate`: llama.cpp's decode speed on SmolLM2 in F32 and BF16.

The GGUFs are requantized from the cached Q4_1 file by llama.cpp itself (allow_requantize), so
they hold the dequantized Q4_1 weights wake2vec imports. 2 threads, 200 greedy tokens after the
Wake prompt, best of 3. Run it outside the project's tree, in a venv:

  python3 -m venv /tmp/llcpp/venv
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" \
      /tmp/llcpp/venv/bin/pip install llama-cpp-python==0.3.36 numpy
  /tmp/llcpp/venv/bin/python scripts/bench_llamacpp.py    # writes /tmp/llcpp/smol-*.gguf
"""
import ctypes
import os
import time

import numpy as np
import llama_cpp

SRC = os.path.expanduser("~/.cache/wake2vec/downloads/SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT = b"riverrun, past Eve and Adam's,"
NEW = 200

for name, ftype in [("f32", llama_cpp.LLAMA_FTYPE_ALL_F32), ("bf16", llama_cpp.LLAMA_FTYPE_MOSTLY_BF16)]:
    out = f"/tmp/llcpp/smol-{name}.gguf"
    os.makedirs("/tmp/llcpp", exist_ok=True)
    if not os.path.exists(out):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = ftype
        p.allow_requantize = True
        p.nthread = 2
        rc = llama_cpp.llama_model_quantize(SRC.encode(), out.encode(), ctypes.byref(p))
        assert rc == 0, rc
    llm = llama_cpp.Llama(model_path=out, n_threads=2, n_threads_batch=2, n_ctx=512, verbose=False)
    best = 0.0
    for run in range(3):
        llm.reset()
        toks = llm.tokenize(PROMPT, add_bos=False)
        llm.eval(toks)
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(NEW):
            llm.eval([t])
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        rate = NEW / (time.perf_counter() - start)
        best = max(best, rate)
        print(f"llama.cpp {name} run {run}: {rate:.1f} tokens/s", flush=True)
    print(f"llama.cpp {name}: {best:.1f} tokens/s (best of 3, {NEW} tokens, {os.path.getsize(out)/1e6:.0f} MB)", flush=True)
    del llm
