#!/usr/bin/env python3
"""Can a per-position level tell the benchmark's facts apart?

A continuum memory level is a SwiGLU block applied to each position's residual
stream. To answer "Your dog's name is" with the dog's name and not the cat's,
the residual at the position that predicts the answer must differ between the
facts' contexts. This script measures, per layer of the backbone (Hugging Face
transformers on the GGUF file, PyTorch CPU), for the 20 facts of
`continuum bench learn` (read from scripts/bench-data/facts-1.json):

* the residual stream entering the layer at the last position of each held-out
  question + answer lead-in (what the level sees when it must recall), and at
  the last position before the answer in each teaching turn (what the level
  saw when it learned), RMS-normalised as the level's input is;
* retrieval: for how many facts the question is closer (cosine) to one of its
  own teaching contexts than to every other fact's (chance: 1/20);
* margin: mean over facts of (best cosine to its own contexts − best cosine
  to another fact's), raw and after subtracting the mean residual of general
  text (Tests/ModelTests/Fixtures/perplexity.txt);
* linear probe: a multinomial logistic regression (20 classes, L2 penalty
  swept, best on the questions reported, so an upper bound) trained on the
  teaching contexts only, tested on the questions: how well a learned linear
  key could tell the facts apart at that layer.

Usage: python3 scripts/level-key-similarity.py [--model PATH.gguf]
Needs torch (CPU), transformers, gguf. Not used by the server or the tests.
"""
import argparse
import os
import json
import re
import warnings

import torch

warnings.filterwarnings("ignore")


def facts(path):
    with open(path) as f:
        return [(x["answer"], x["teach"], x["question"], x["lead_in"]) for x in json.load(f)["facts"]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/continuum/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--facts", default="scripts/bench-data/facts-1.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error()
    d, f = os.path.split(args.model)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f)

    def states(text):
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hs = model(**ids, output_hidden_states=True).hidden_states
        # hs[l]: the residual entering layer l, [1, T, D]; RMS-normalised per row.
        return [h[0] / h[0].pow(2).mean(-1, keepdim=True).sqrt() for h in hs[:-1]]

    fs = facts(args.facts)
    user = lambda s: f"<|im_start|>user\n{s}<|im_end|>\n"
    questions = [states(user(q) + "<|im_start|>assistant\n" + lead)[:] for _, _, q, lead in fs]
    q_last = [[h[-1] for h in s] for s in questions]
    teach_last = []   # per fact: list of per-layer vectors, one per teaching context
    for answer, teach, _, _ in fs:
        ctx = []
        for t in teach:
            i = t.lower().find(answer.lower())
            if i > 0:   # the answer is predicted from the words before it
                ctx.append([h[-1] for h in states(user(t[:i].rstrip()))])
        teach_last.append(ctx)
    general = states(open("Tests/ModelTests/Fixtures/perplexity.txt").read())
    layers = len(general)
    print(f"{len(fs)} facts, {sum(len(c) for c in teach_last)} teaching contexts; chance retrieval {100 / len(fs):.0f}%")
    print("| layer | retrieval raw | margin raw | retrieval centred | margin centred | linear probe (best L2) |")
    print("|---|---|---|---|---|---|")
    for l in range(0, layers, 3):
        mu = general[l].mean(0)
        row = [str(l)]
        for centre in (torch.zeros_like(mu), mu):
            hits, margins = 0, []
            for i in range(len(fs)):
                q = q_last[i][l] - centre
                best = [max(float(torch.nn.functional.cosine_similarity(q, c[l] - centre, dim=0)) for c in teach_last[j])
                        for j in range(len(fs))]
                other = max(b for j, b in enumerate(best) if j != i)
                hits += best[i] > other
                margins.append(best[i] - other)
            row += [f"{hits}/{len(fs)}", f"{sum(margins) / len(margins):+.3f}"]
        x = torch.stack([c[l] - mu for ctx in teach_last for c in ctx])
        y = torch.tensor([i for i, ctx in enumerate(teach_last) for _ in ctx])
        xq = torch.stack([q_last[i][l] - mu for i in range(len(fs))])
        best = 0
        for penalty in (1e-4, 1e-3, 1e-2, 1e-1):
            torch.manual_seed(0)
            w = torch.zeros(x.shape[1], len(fs), requires_grad=True)
            b = torch.zeros(len(fs), requires_grad=True)
            opt = torch.optim.LBFGS([w, b], max_iter=200)

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(x @ w + b, y) + penalty * w.pow(2).sum()
                loss.backward()
                return loss
            opt.step(closure)
            with torch.no_grad():
                best = max(best, int(((xq @ w + b).argmax(1) == torch.arange(len(fs))).sum()))
        row.append(f"{best}/{len(fs)}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
