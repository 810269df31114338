#!/usr/bin/env python3
"""Build a SYNTHETIC run directory (docs/formats.md layout) from a real model directory, to try
`wake2vec analyze` / `wake2vec report` before a real training run exists.

The base rows are the model's own embedding rows; the "Wake" rows start as the original's
spherical init (random directions at 1.5x the mean base norm) and move, step by step, toward
means of a few base rows, so drift, trajectories and the loss figure have something to show.
The loss log is made up (a decaying curve with noise). Nothing here is a measurement.

  /root/wake2vec-ref/venv/bin/python scripts/make_demo_run.py \
      --model /root/models/smollm2-135m --lexicon ../shared/data/wake_lexicon.txt --out /tmp/demo-run
"""
import argparse
import json
import math
import os
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lexicon", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--wake", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()

    rng = np.random.default_rng(7)
    w = load_file(os.path.join(args.model, "model.safetensors"))
    key = next(k for k in w if k.endswith("embed_tokens.weight"))
    base = w[key].astype(np.float32)
    B, d = base.shape
    words = []
    with open(args.lexicon, encoding="utf-8") as fh:
        for line in fh:
            t = line.strip()
            if t and not t.startswith("#"):
                words.append(t)
            if len(words) == args.wake:
                break
    N = len(words)
    mean_norm = np.linalg.norm(base, axis=1).mean()
    init = rng.standard_normal((N, d)).astype(np.float32)
    init *= (1.5 * mean_norm / np.linalg.norm(init, axis=1, keepdims=True))
    target = base[rng.integers(0, B, size=(N, 3))].mean(1)

    def wake_at(step):
        a = 0.7 * math.sqrt(step / args.steps)
        noise = 0.02 * mean_norm * rng.standard_normal((N, d)).astype(np.float32) * (step > 0)
        return ((1 - a) * init + a * target + noise).astype(np.float32)

    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(os.path.join(args.out, "snapshots"))
    for step in range(0, args.steps + 1, args.every):
        rows = wake_at(step)
        save_file({"wake_rows": rows}, os.path.join(args.out, "snapshots", f"step-{step}.safetensors"),
                  metadata={"step": str(step), "wake_start": str(B), "base_vocab": str(B)})
    ck = os.path.join(args.out, "checkpoints", f"step-{args.steps}")
    os.makedirs(ck)
    full = np.concatenate([base, rows]).astype(np.float32)
    save_file({"model.embed_tokens.weight": full}, os.path.join(ck, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    cfg["vocab_size"] = B + N
    json.dump(cfg, open(os.path.join(ck, "config.json"), "w"), indent=1)
    shutil.copy(os.path.join(args.model, "tokenizer.json"), ck)
    wj = {"format": 1, "base_model": "smollm2-135m (SYNTHETIC demo run)", "base_vocab": B,
          "base_tokenizer_size": B, "wake_start": B, "wake_count": N, "words": words, "existing": {},
          "init": {"scheme": "spherical", "seed": 7, "radius_factor": 1.5}, "case": "lower",
          "lexicon": {"path": args.lexicon, "entries": N}}
    json.dump(wj, open(os.path.join(ck, "wake2vec.json"), "w"))
    with open(os.path.join(args.out, "log.jsonl"), "w") as fh:
        for step in range(0, args.steps + 1):
            loss = 6.1 + 19.0 * math.exp(-step / 25.0) + 0.15 * rng.standard_normal()
            if step > 0:
                fh.write(json.dumps({"kind": "step", "phase": "p1", "step": step, "loss": loss, "lr": 5e-4,
                                     "grad_norm": 1.0, "tokens_per_s": 120.0, "elapsed_s": 2.1 * step}) + "\n")
            if step % 25 == 0:
                val = 6.3 + 19.1 * math.exp(-step / 25.0) + 0.03 * rng.standard_normal()
                fh.write(json.dumps({"kind": "eval", "phase": "p1", "step": step, "val_loss": val,
                                     "val_bpb": val / math.log(2) / 3.6, "train_loss": loss}) + "\n")
    with open(os.path.join(args.out, "run.toml"), "w") as fh:
        fh.write('# SYNTHETIC demo run made by scripts/make_demo_run.py: no training happened\n'
                 f'phase = "p1"\nmax_steps = {args.steps}\nsnapshot_every = {args.every}\n'
                 'lr = 5e-4\noptimizer = "adafactor"\nblock = 256\n')
    print(f"wrote {args.out}: {B} base rows + {N} synthetic Wake rows, {args.steps // args.every + 1} snapshots")


if __name__ == "__main__":
    main()
