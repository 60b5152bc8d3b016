#!/usr/bin/env python3
"""Reference fixtures for Continuum's engine tests, produced by implementations
nobody on this project wrote: Hugging Face `tokenizers` and `transformers`
(PyTorch CPU). The outputs are committed under Tests/ModelTests/Fixtures so CI
needs no PyTorch.

    pip install 'torch==2.13.0+cpu' transformers tokenizers gguf
    scripts/make-fixtures.py [--model PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes:
  tokenizer-corpus.json    >= 5,000 lines of real text (prose, code, numbers,
                           whitespace runs, non-Latin scripts, emoji) with the
                           ids HF `tokenizers` gives for each
  smollm2-reference.json   prompts, their ids, greedy 64-token continuations
                           (transformers generate), chat-template rendering,
                           perplexity of perplexity.txt
  smollm2-logits-*.f32     logits at the first, middle and last prompt
                           positions (float32, little-endian, [3, V])
  tiny-llama/              a tiny random Llama saved by transformers
                           (config.json, model.safetensors, tokenizer.json)
  tiny-reference.json      its tokenizations and logits
  digits-tokenizer.json    a small BPE with SmolLM2's Digits+ByteLevel
                           pre-tokenizer (its ids are in tiny-reference.json)
"""
import argparse
import glob
import json
import os
import random
import sys
import sysconfig

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "Tests", "ModelTests", "Fixtures")
DEFAULT_MODEL = os.path.expanduser("~/.cache/continuum/models/SmolLM2-135M-Instruct.Q4_1.gguf")


# ---------------------------------------------------------------------------
# Corpus: real text found on a Debian machine with CPython and the packages
# above, chosen deterministically.

def read_lines(path):
    with open(path, encoding="utf-8", errors="strict") as f:
        return f.read().split("\n")


def pick(lines, n, rng, keep=lambda s: True):
    lines = [l for l in lines if keep(l)]
    if len(lines) <= n:
        return lines
    start = rng.randrange(0, len(lines) - n)
    return lines[start:start + n]


def build_corpus():
    rng = random.Random(20261122)
    stdlib = sysconfig.get_paths()["stdlib"]
    site = sysconfig.get_paths()["purelib"]
    nonblank = lambda s: s.strip() != ""
    out = []

    def add(kind, paths, per_file, keep=nonblank):
        for p in paths:
            if os.path.exists(p):
                out.extend((kind, l) for l in pick(read_lines(p), per_file, rng, keep))

    # Prose.
    add("prose", ["/usr/share/common-licenses/" + n for n in ("GPL-3", "Apache-2.0", "MPL-2.0", "Artistic", "GFDL-1.3")], 300)
    add("prose", sorted(glob.glob(os.path.join(site, "*.dist-info", "METADATA")))[:40], 25)
    # Code, with its whitespace runs and tabs.
    add("code", [os.path.join(stdlib, n) for n in ("json/decoder.py", "textwrap.py", "heapq.py", "argparse.py",
                                                   "difflib.py", "tokenize.py", "string.py", "csv.py")], 150, keep=lambda s: True)
    add("code", ["/usr/include/stdio.h", "/usr/include/stdlib.h", "/usr/include/string.h"], 120, keep=lambda s: True)
    add("code", [os.path.join(stdlib, "test", "tokenizedata", "tokenize_tests.txt")], 150, keep=lambda s: True)
    # Numbers.
    add("numbers", sorted(glob.glob(os.path.join(stdlib, "test", "decimaltestdata", "*.decTest")))[:12], 40)
    add("numbers", [os.path.join(stdlib, "test", "mathdata", n) for n in ("math_testcases.txt", "cmath_testcases.txt", "ieee754.txt")], 100)
    # Non-Latin scripts: CJK test texts, docutils translations (Arabic, Persian,
    # Russian, Chinese, Japanese, Korean, Hebrew, …).
    add("non-latin", sorted(glob.glob(os.path.join(stdlib, "test", "cjkencodings", "*-utf8.txt"))), 40)
    add("non-latin", sorted(glob.glob(os.path.join(site, "docutils", "languages", "*.py"))), 25,
        keep=lambda s: nonblank(s) and any(ord(c) > 0x2FF for c in s))
    add("non-latin", sorted(glob.glob(os.path.join(site, "docutils", "parsers", "rst", "languages", "*.py"))), 30,
        keep=lambda s: nonblank(s) and any(ord(c) > 0x2FF for c in s))
    add("non-latin", [os.path.join(stdlib, "test", "test_unicode.py")], 200, keep=lambda s: any(ord(c) > 0x7F for c in s))
    # Emoji.
    add("emoji", [os.path.join(site, "rich", "_emoji_codes.py")], 400)
    # Whitespace-only lines and runs, as they occur in real files.
    add("whitespace", [os.path.join(stdlib, n) for n in ("argparse.py", "pydoc.py", "inspect.py")], 250, keep=lambda s: s != "" and (s.strip() == "" or "  " in s.strip() or "\t" in s or s.endswith(" ")))

    # Multi-line blocks (newlines inside one text), from what was chosen.
    lines = [l for _, l in out]
    blocks = []
    for i in range(0, min(len(lines) - 5, 2500), 10):
        blocks.append(("block", "\n".join(lines[i:i + 5]) + "\n"))
    return out + blocks


def smollm2_tokenizer(gguf_path):
    """SmolLM2's tokenizer as HF `tokenizers` defines it (the settings of the
    model's tokenizer.json: BPE, Digits(individual) + ByteLevel, no unk),
    with the vocabulary and merges stored in the GGUF file."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers

    r = GGUFReader(gguf_path)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3])
    return tok


def write_f32(path, array):
    np.asarray(array, dtype="<f4").tofile(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    args = ap.parse_args()
    os.makedirs(FIXTURES, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    torch.set_num_threads(2)

    # --- Tokenizer corpus -------------------------------------------------
    tok = smollm2_tokenizer(args.model)
    corpus = build_corpus()
    texts = [t for _, t in corpus]
    kinds = {}
    for k, _ in corpus:
        kinds[k] = kinds.get(k, 0) + 1
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    with open(os.path.join(FIXTURES, "tokenizer-corpus.json"), "w", encoding="utf-8") as f:
        json.dump({"source": "tokenizers " + __import__("tokenizers").__version__, "kinds": kinds,
                   "texts": texts, "ids": ids}, f, ensure_ascii=False, separators=(",", ":"))
    print(f"tokenizer corpus: {len(texts)} texts {kinds}", file=sys.stderr)

    # transformers' own GGUF tokenizer, for information only.
    d, name = os.path.split(args.model)
    hf_tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    differ = [t for t, i in zip(texts, ids) if hf_tok.encode(t, add_special_tokens=False) != i]
    print(f"transformers' GGUF-converted tokenizer differs on {len(differ)} of {len(texts)} texts"
          f" (it does not isolate digits), e.g. {differ[:1]!r}", file=sys.stderr)

    # --- SmolLM2 logits, greedy continuations, perplexity -------------------
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    chat_messages = [{"role": "user", "content": "What is gravity? Answer in one sentence."}]
    chat_text = hf_tok.apply_chat_template(chat_messages, add_generation_prompt=True, tokenize=False)
    prompts = [
        ("plain", "The capital of France is"),
        ("chat", chat_text),
        ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
        ("numbers", "En 2023, la population de Paris était de 2 102 650 habitants, soit"),
    ]
    ref = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
           "model_sha256_prefix": "b179c952", "prompts": [],
           "chat": {"messages": chat_messages, "rendered": chat_text}}
    for pname, text in prompts:
        pids = tok.encode(text, add_special_tokens=False).ids
        x = torch.tensor([pids])
        with torch.no_grad():
            logits = model(x).logits[0].float().numpy()
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=64,
                                 eos_token_id=2, pad_token_id=2)[0, len(pids):].tolist()
        fname = f"smollm2-logits-{pname}.f32"
        positions = sorted({0, len(pids) // 2, len(pids) - 1})
        write_f32(os.path.join(FIXTURES, fname), logits[positions])
        ref["prompts"].append({"name": pname, "text": text, "ids": pids, "logits": fname,
                               "positions": positions, "greedy": gen})
        print(f"{pname}: {len(pids)} tokens, greedy -> {tok.decode(gen)!r}", file=sys.stderr)

    with open(os.path.join(FIXTURES, "perplexity.txt"), encoding="utf-8") as f:
        ptext = f.read()
    pids = tok.encode(ptext, add_special_tokens=False).ids
    with torch.no_grad():
        logits = model(torch.tensor([pids])).logits[0].double()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(pids[1:]), reduction="sum").item()
    n = len(pids) - 1
    ref["perplexity"] = {"file": "perplexity.txt", "tokens": n, "total_nll": nll, "perplexity": float(np.exp(nll / n))}
    print(f"perplexity.txt: {n} scored tokens, perplexity {np.exp(nll / n):.4f}", file=sys.stderr)
    with open(os.path.join(FIXTURES, "smollm2-reference.json"), "w", encoding="utf-8") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)

    make_tiny(texts)


def make_tiny(texts):
    """A tiny random Llama (width 64, 2 layers, GQA, untied head) with its own
    byte-level BPE, saved by transformers as safetensors + tokenizer.json."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    out = os.path.join(FIXTURES, "tiny-llama")
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts[:3000], trainer=trainer)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
                   "eos_token": "<|im_end|>"}, f, indent=1)
    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=2)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so logits differ visibly
            p.normal_(0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    # A second byte-level BPE with SmolLM2's pre-tokenizer (Digits + ByteLevel),
    # to check that tokenizer.json form too.
    digits = Tokenizer(models.BPE())
    digits.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    digits.decoder = decoders.ByteLevel()
    digits.train_from_iterator(texts[:3000], trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    digits.save(os.path.join(FIXTURES, "digits-tokenizer.json"))
    samples = texts[::97][:50]
    prompt = "Hello tiny model: 1234 + 5678 = ?\n\tdef f(x): return x"
    pids = tok.encode(prompt).ids
    with torch.no_grad():
        logits = model(torch.tensor([pids])).logits[0].numpy()
    write_f32(os.path.join(FIXTURES, "tiny-logits.f32"), logits)
    with open(os.path.join(FIXTURES, "tiny-reference.json"), "w", encoding="utf-8") as f:
        json.dump({"texts": samples, "ids": [tok.encode(t).ids for t in samples],
                   "digits_ids": [digits.encode(t).ids for t in samples],
                   "prompt": prompt, "prompt_ids": pids, "logits": "tiny-logits.f32", "vocab": tok.get_vocab_size()},
                  f, ensure_ascii=False, indent=1)
    print(f"tiny-llama: vocabulary {tok.get_vocab_size()}, prompt {len(pids)} tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
