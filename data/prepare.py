"""Builds the multi-domain data set: token streams split by document, written once for training to memory-map.

    python data/prepare.py                                 # the default set into data/default (seconds)
    python data/prepare.py --only=python,arith --max_tokens=100000
    python data/prepare.py --domain=recipes='my/recipes/*.txt' --domain=chat=alpaca.jsonl

The built-in domains come from text present wherever Python and torch are installed, so no network:
- python:  the standard library's top-level *.py files, one document per file.
- cpp:     the C++ headers shipped inside torch (include/**/*.h), one document per file.
- prose:   the English help topics of Python's docs (pydoc_data.topics), one document per topic.
- arith:   generated problems "12+4=16" / "5-7=-2", one per line, 16 lines per document. Its
           answers are exact, so evaluate.py scores it by greedy decoding (see arith_problems).
- unicode: "U+00E9 é LATIN SMALL LETTER E WITH ACUTE" for every printable named code point, 32 per
           document. It is held back: trained on only later, when a domain is added to the mixture.
A user domain (--domain=NAME=PATH_OR_GLOB) takes every file matched: a .jsonl file gives one document
per record ({"text"}, or Alpaca's {"instruction", "input", "output"}), any other file is one document.

Documents are shuffled with a seeded RNG and ~10% of them go to val, so no document is in both splits
(a split by token window would put halves of one file in both). A split is its documents' tokens, EOT
after each, capped at --max_tokens (val at a tenth) at a document's end; documents are cut at 20000 chars.

Layout: OUT/<domain>/{train,val}.bin (raw np.uint16 token ids) and OUT/meta.json (tokenizer, vocab_size,
eot, per-domain token and document counts, held-back domains, seed), written last.

Read next: train_base.py.
"""
import glob
import json
import os
import random
import re
import sys
import sysconfig
import time
import unicodedata
from dataclasses import dataclass, field

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from config import UserError, parse_config, run  # noqa: E402  (these need the repo root on the path)
from files import atomic_write  # noqa: E402
from tokenizer import encode, get_tokenizer  # noqa: E402

SOURCES = {  # built-in domain -> where its text comes from
    "python": "Python standard library source (top-level *.py), one file per document",
    "cpp": "C++ headers shipped with torch (include/**/*.h), one file per document",
    "prose": "English help topics of the Python docs (pydoc_data.topics), one topic per document",
    "arith": "generated 2-digit addition and subtraction, 16 problems per document",
    "unicode": "generated Unicode code point names (unicodedata), 32 code points per document",
}
HELD_BACK = ["unicode"]
MAX_DOC_CHARS = 20000  # longer documents are cut, so one big file cannot dominate a domain


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def is_test_pair(a, b):
    """One (a, b) pair in ten is reserved for evaluation and never appears in training data. The rule
    reads a's tens digit, so every units-digit sum (a % 10, b) is still seen in training."""
    return (a // 10 + b) % 10 == 0


def arith_problems(n, seed, test=False):
    """n problems as (prompt, answer) pairs, e.g. ("12+4=", "16"), ("5-7=", "-2"); a in 0..99, b in 0..9
    (two digits and one: small enough for a tiny byte-level model to learn in minutes).

    test=False draws only training pairs, test=True only the reserved ones, so exact match measures
    arithmetic, not recall of problems seen in training.
    """
    rng = random.Random(seed)
    problems = []
    while len(problems) < n:
        a, b, op = rng.randint(0, 99), rng.randint(0, 9), rng.choice("+-")
        if is_test_pair(a, b) == test:
            problems.append((f"{a}{op}{b}=", str(a + b if op == "+" else a - b)))
    return problems


def arith_documents(n_docs, seed):
    lines = [f"{prompt}{answer}\n" for prompt, answer in arith_problems(16 * n_docs, seed)]
    return ["".join(lines[i:i + 16]) for i in range(0, len(lines), 16)]


def unicode_documents():
    lines = []
    for code in range(0x110000):
        ch = chr(code)
        name = unicodedata.name(ch, None)
        # isprintable() is False for control, format, surrogate, unassigned; names that only repeat the
        # code point ("CJK UNIFIED IDEOGRAPH-4E00") are skipped, they are most of Unicode and say nothing
        if name and ch.isprintable() and not name.endswith(f"{code:04X}"):
            lines.append(f"U+{code:04X} {ch} {name}\n")
    return ["".join(lines[i:i + 32]) for i in range(0, len(lines), 32)]


def builtin_documents(name, max_tokens, seed):
    """The documents (strings) of a built-in domain."""
    if name == "python":
        paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    elif name == "cpp":
        import torch  # only this domain needs it, and importing it takes seconds
        include = os.path.join(os.path.dirname(torch.__file__), "include")
        paths = sorted(glob.glob(os.path.join(include, "**", "*.h"), recursive=True))
    elif name == "prose":
        from pydoc_data.topics import topics
        return [topics[key] for key in sorted(topics)]
    elif name == "arith":
        return arith_documents(max_tokens // 50 + 2, seed)  # 100-140 tokens each: enough to fill both caps
    else:
        return unicode_documents()
    return [text for text in map(read_text, paths) if text.strip()]  # skip empty files


def nonempty(text, where):
    if not text.strip():
        raise UserError(f"{where}: empty text")
    return text


def record_text(record, where):
    """A .jsonl record -> its document: the "text" field, or an Alpaca record in one fixed template."""
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return nonempty(record["text"], where)
    if isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("instruction", "output")):
        given = f"### Input:\n{record['input']}\n\n" if record.get("input") else ""  # no Input section when empty
        return f"### Instruction:\n{record['instruction']}\n\n{given}### Response:\n{record['output']}\n"
    raise UserError(f'{where}: a record needs a "text" field, or "instruction" and "output" (and optionally "input")')


def user_documents(name, pattern):
    """The documents of a --domain NAME=PATH_OR_GLOB: one per .jsonl record, one per other file."""
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise UserError(f"--domain={name}={pattern}: matches no files")
    docs = []
    for path in paths:
        if not path.endswith(".jsonl"):
            docs.append(nonempty(read_text(path), path))
            continue
        for i, line in enumerate(read_text(path).splitlines(), start=1):
            if not line.strip():
                continue  # blank lines between records are allowed
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{i}: not valid JSON")
            docs.append(record_text(record, f"{path}:{i}"))
    return docs


def split_documents(docs, enc, max_tokens, rng):
    """Shuffles docs, sends ~10% to val, and encodes each split until its cap.
    -> {"train": (tokens uint16 (N,), n_docs), "val": (...)}"""
    docs = list(docs)
    rng.shuffle(docs)
    n_val = min(max(1, len(docs) // 10), len(docs) - 1)  # at least one document on each side
    out = {}
    for split, part, cap in (("val", docs[:n_val], max(1, max_tokens // 10)), ("train", docs[n_val:], max_tokens)):
        chunks, n_tokens = [], 0
        for doc in part:
            if n_tokens >= cap:
                break
            chunks.append(encode(enc, doc[:MAX_DOC_CHARS]) + [enc.eot_token])  # EOT ends every document
            n_tokens += len(chunks[-1])
        out[split] = (np.array([t for c in chunks for t in c], dtype=np.uint16), len(chunks))
    return out


def write_bytes(path, data):
    """Writes bytes so that a reader sees the old file or the new one, never half of one."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def read_domains(only, domain_specs, max_tokens, seed):
    """Reads every selected domain before anything is written, so bad input leaves old data untouched.
    -> {name: (documents, source, task)}, the built-in domains first."""
    names = [n.strip() for n in only.split(",") if n.strip()] if only else list(SOURCES)
    for name in names:
        if name not in SOURCES:
            raise UserError(f"--only: unknown domain {name!r}; built-in domains: {', '.join(SOURCES)}")
    specs = []
    for spec in domain_specs:
        name, _, pattern = spec.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not pattern:
            raise UserError(f"--domain={spec}: expected NAME=PATH_OR_GLOB, NAME of letters, digits, _ and -")
        specs.append((name, pattern))
    if not names and not specs:
        raise UserError("no domains to build: --only selected none and no --domain was given")
    domains = {}
    for name in names:
        task = "arith" if name == "arith" else None  # a task domain is also scored by exact match
        domains[name] = (builtin_documents(name, max_tokens, seed), SOURCES[name], task)
    for name, pattern in specs:
        domains[name] = (user_documents(name, pattern), f"user files {pattern}", None)  # replaces a same-named built-in
    for name, (docs, _, _) in domains.items():
        if len(docs) < 2:
            raise UserError(f"domain {name!r} has {len(docs)} document(s); a train/val split needs at least 2")
    return domains


@dataclass
class PrepareConfig:
    out_dir: str = os.path.join(REPO_ROOT, "data", "default")
    seed: int = 1337
    max_tokens: int = 600000  # train tokens per domain (val: a tenth)
    tokenizer: str = "bytes"  # bytes | gpt2 | a folder with GPT-2's vocab.json + merges.txt
    only: str = ""  # comma-separated built-in domains (default: all of them)
    domain: list = field(default_factory=list)  # NAME=PATH_OR_GLOB, once per user domain (.txt files or .jsonl)


def main(argv=None):
    args = parse_config(PrepareConfig, argv or [])
    t0 = time.time()
    out = args.out_dir
    if args.max_tokens < 1:
        raise UserError(f"--max_tokens must be positive, got {args.max_tokens}")
    enc = get_tokenizer(args.tokenizer)
    if enc.n_vocab > 2 ** 16:
        raise UserError(f"tokenizer {args.tokenizer!r} has {enc.n_vocab} tokens; the .bin files hold uint16 ids (at most 65536)")

    domains = read_domains(args.only, args.domain, args.max_tokens, args.seed)
    meta = {"tokenizer": args.tokenizer, "vocab_size": enc.n_vocab, "eot": enc.eot_token, "domains": {},
            "held_back": [n for n in HELD_BACK if n in domains], "seed": args.seed}
    for name, (docs, source, task) in domains.items():
        rng = random.Random(f"{args.seed}:{name}")  # a str seed is stable across runs, independent per domain
        splits = split_documents(docs, enc, args.max_tokens, rng)
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for split, (tokens, _) in splits.items():
            write_bytes(os.path.join(out, name, f"{split}.bin"), tokens.tobytes())
        (train, n_train), (val, n_val) = splits["train"], splits["val"]
        meta["domains"][name] = {"train_tokens": len(train), "val_tokens": len(val), "train_docs": n_train,
                                 "val_docs": n_val, "source": source, "task": task}
        print(f"{name:>8}: docs {n_train}/{n_val}, tokens {len(train):,}/{len(val):,} (train/val)")
    write_bytes(os.path.join(out, "meta.json"), json.dumps(meta, indent=2).encode())
    print(f"wrote {out} in {time.time() - t0:.1f}s")
    return meta


if __name__ == "__main__":
    run(main)
