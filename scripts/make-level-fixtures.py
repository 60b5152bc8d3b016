#!/usr/bin/env python3
"""Reference gradients for Continuum's memory levels, from PyTorch autograd.

    pip install 'torch==2.13.0+cpu' transformers
    scripts/make-level-fixtures.py

Loads the tiny random Llama that scripts/make-fixtures.py saved
(Tests/ModelTests/Fixtures/tiny-llama), adds two memory levels after the
frozen MLP of chosen layers exactly as ARCHITECTURE.md §1 defines them
(h ← h + W_down(silu(W_gate u) ⊙ W_up u), u = RMSNorm(h)·gain, levels applied
slowest first), computes the mean next-token loss over a mask of learnable
targets and its gradients with respect to the level parameters only, and
writes Tests/MemoryTests/Fixtures/level-gradients.json.
"""
import json
import os

import torch
from transformers import LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "Tests", "ModelTests", "Fixtures", "tiny-llama")
OUT = os.path.join(ROOT, "Tests", "MemoryTests", "Fixtures", "level-gradients.json")

LEVELS = [  # slowest first, as in the LevelConfiguration
    {"name": "mid", "chunk_size": 16, "width": 6, "layers": [1]},
    {"name": "fast", "chunk_size": 4, "width": 4, "layers": [0, 1]},
]


def main():
    torch.manual_seed(77)
    model = LlamaForCausalLM.from_pretrained(TINY, dtype=torch.float64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    d, eps = cfg.hidden_size, cfg.rms_norm_eps
    params = []   # per level, per layer: dict of tensors
    for lv in LEVELS:
        blocks = []
        for _ in lv["layers"]:
            r = lv["width"]
            blocks.append({
                "gain": (1 + 0.1 * torch.randn(d, dtype=torch.float64)).requires_grad_(),
                "gate": (torch.randn(r, d, dtype=torch.float64) / d ** 0.5).requires_grad_(),
                "up": (torch.randn(r, d, dtype=torch.float64) / d ** 0.5).requires_grad_(),
                "down": (0.3 * torch.randn(d, r, dtype=torch.float64)).requires_grad_(),
            })
        params.append(blocks)

    def block(h, b):
        u = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * b["gain"]
        return h + (torch.nn.functional.silu(u @ b["gate"].T) * (u @ b["up"].T)) @ b["down"].T

    def hook(layer_index):
        def f(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            for li, lv in enumerate(LEVELS):
                if layer_index in lv["layers"]:
                    h = block(h, params[li][lv["layers"].index(layer_index)])
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        return f

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(hook(i))

    ref = json.load(open(os.path.join(ROOT, "Tests", "ModelTests", "Fixtures", "tiny-reference.json")))
    tokens = ref["prompt_ids"]
    learnable = [False] + [(i % 5) != 0 for i in range(1, len(tokens))]   # a mask with gaps
    logits = model(torch.tensor([tokens])).logits[0]
    rows = [i for i in range(len(tokens) - 1) if learnable[i + 1]]
    loss = torch.nn.functional.cross_entropy(logits[rows], torch.tensor([tokens[i + 1] for i in rows]), reduction="mean")
    loss.backward()

    def flat(t):
        return [float(x) for x in t.detach().reshape(-1)]

    out = {"torch": torch.__version__, "levels": LEVELS, "tokens": tokens, "learnable": learnable,
           "loss": float(loss), "count": len(rows),
           "params": [[{k: flat(v) for k, v in b.items()} for b in blocks] for blocks in params],
           "gradients": [[{k: flat(v.grad) for k, v in b.items()} for b in blocks] for blocks in params]}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f)
    print(f"loss {float(loss):.6f} over {len(rows)} targets -> {OUT}")


if __name__ == "__main__":
    main()
