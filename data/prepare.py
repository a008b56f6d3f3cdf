"""Builds nanoMoA's data: a text corpus to pretrain the base on, and the tasks MoA routes between.

    python data/prepare.py                                  # the default corpus and tasks into data/default (seconds)
    python data/prepare.py --task=recipes=my/recipes.jsonl  # plus a task of your own (see below)
    python data/prepare.py --tokenizer=gpt2 --out_dir=data/gpt2 --task=chat=alpaca.jsonl --only=none

The corpus (raw text, for train_base.py) comes from text on every machine with Python and torch, so
no download: `python` (the standard library's top-level *.py files), `cpp` (the C++ headers inside
torch) and `prose` (the English help topics of Python's docs), one document per file or topic.

Each task is a domain in the paper's sense: a supervised data set of (prompt -> response) records,
routed as a whole from its prompt. The built-in tasks are generated, each in its own instruction style
and with an answer that can be checked exactly (three phrasings per task, drawn at random):
- upper:   "UPPERCASE: spam" -> "SPAM"
- double:  "double every letter -> spam" -> "ssppaamm"
- reverse: "Reverse the word: spam" -> "maps"
- arith:   "57+8=" or "What is 57 plus 8?" -> "65"          (a in 0..99, b in 0..9, + or -)
- count:   "How many letters are in 'spam'?" -> "4"        held back: added later, as a new domain
The word tasks read the same kind of input (an English word of 3 to 6 letters) and want different
outputs, so one LoRA trained on all of them must keep them apart (the interference the paper is
about); upper and double also share a skill (copying a word letter by letter, in order) that
reverse turns around and arith does not use. Words come from the standard library's source and
docs; a word in a validation record never occurs in a training record, and one (a, b) pair in ten
is kept for validation only, so exact match measures the skill, not recall.

Your own task: --task=NAME=FILE.jsonl, one record per line, either {"prompt": ..., "response": ...}
or Alpaca's {"instruction": ..., "input": ..., "output": ...}, written in one fixed template:
    "### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n" + output
(the Input section is left out when input is empty). A bad record stops with its file and line.
Records are split at random into train, val (10%, at least one) and, from 20 records on, calib (10%):
train_router.py fits the routers' confidence on calib. --phrasings=NAME=FILE.txt gives instructions, one
per line, that none of the task's (Alpaca) records uses: calib's records are then asked in the odd
lines' phrasings, and an unseen split (val's records in the even lines' phrasings, never trained or
fitted on) measures routing off the training phrasings. Every task's line gives its records' longest
and 95th-percentile length, and how many a context of --context tokens cuts, with the context that
fits them all (train_base.py --block_size; demo.py picks it itself). Your own corpus text for the
base: --text=NAME=GLOB (text files, or .jsonl with a "text" field).

Layout, in OUT (default data/default): corpus/<name>/{train,val}.bin, the documents' token ids as
uint16, each document ended by EOT; tasks/<name>/{train,val}.bin, the records' tokens one after the
other (prompt, response, EOT), with {train,val}.idx, int64 rows (start, prompt length, length), so
training reads records without parsing text; for the built-in tasks also calib.{bin,idx}, validation
words in one more phrasing per task that no split trains on (train_router.py calibrates the routers'
confidence on it), and for your own tasks the splits above; meta.json. Everything is built in a temporary folder
that replaces OUT only when complete: a failure leaves the old data whole.

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
from dataclasses import dataclass, field

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from config import AT_LEAST_0, AT_LEAST_1, UserError, check_memory, parse_config, run  # noqa: E402  (need the root)
from data import tasks  # noqa: E402
from storage import atomic_write, check_outputs  # noqa: E402
from tokenizer import encode, get_tokenizer  # noqa: E402

CORPUS = {  # built-in corpus source -> where its text comes from
    "python": "Python standard library source (top-level *.py), one file per document",
    "cpp": "C++ headers shipped with torch (include/**/*.h), one file per document",
    "prose": "English help topics of the Python docs (pydoc_data.topics), one topic per document",
    "skills": "the tasks' skills without instructions (data/tasks.py): training words and sums, transformed",
}
ALPACA = "### Instruction:\n{instruction}\n\n{given}### Response:\n"  # given: "### Input:\n{input}\n\n" or ""
MAX_DOC_CHARS = 20000  # longer corpus documents are cut, so one big file cannot dominate a source


@dataclass
class PrepareConfig:
    out_dir: str = os.path.join(REPO_ROOT, "data", "default")  # the data set's folder (replaced whole)
    seed: int = 1337  # which words are validation words, and every generated record
    tokenizer: str = "bytes"  # bytes | gpt2 | a folder with GPT-2's vocab.json + merges.txt
    only: str = "all"  # comma-separated built-in corpus sources and tasks to build; none: none of them
    max_tokens: int = 600000  # corpus: train tokens per source (val: a tenth)
    records: int = 20000  # built-in tasks: train records per task
    val_records: int = 500  # built-in tasks: validation records per task
    task: list = field(default_factory=list)  # NAME=FILE.jsonl, once per task of your own
    phrasings: list = field(default_factory=list)  # NAME=FILE.txt: instructions no record of task NAME uses
    text: list = field(default_factory=list)  # NAME=GLOB, once per corpus source of your own
    held_back: str = "auto"  # tasks left for adding later (comma list); auto: the built-in count, if built
    small_task: str = ""  # a built-in task given a tenth of --records (the imbalanced variant of the suite)
    context: int = 0  # warn about records longer than this many tokens; 0: 128 (the default base), 1024 with gpt2

    CHECKS = {"max_tokens": AT_LEAST_1, "records": AT_LEAST_1, "val_records": AT_LEAST_1, "context": AT_LEAST_0}


# ----------------------------------------------------------------------------------------------
# The corpus


def read_text(path, user=False):
    """A text file's contents. A built-in source's stray bytes are replaced; a user's file must be UTF-8 text
    without NUL bytes, or it is a UserError naming it (binary data would train as if it were text)."""
    if not user:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if b"\0" in data:
        raise UserError(f"{path} is binary, not text (it holds NUL bytes)")
    try:
        return data.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not text
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8, e.g. with iconv") from None


def corpus_documents(name, seed):
    """The documents (strings) of a built-in corpus source (seed: which words the skills use)."""
    if name == "prose":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    if name == "skills":
        return tasks.skill_documents(seed)
    if name == "python":
        paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    else:
        import torch  # only the C++ source needs it, and importing it takes seconds

        paths = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "include", "**", "*.h"), recursive=True))
    return [text for text in map(read_text, paths) if text.strip()]  # skip empty files


def jsonl(path):
    """(line number, record) of every non-blank line of a .jsonl file; invalid JSON is a UserError at file:line."""
    for i, line in enumerate(read_text(path, user=True).splitlines(), start=1):
        if line.strip():  # blank lines between records are allowed
            try:
                yield i, json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested too deeply
                raise UserError(f"{path}:{i}: not valid JSON") from None


def user_documents(name, pattern):
    """The documents of --text=NAME=GLOB: one per file, or one per "text" record of a .jsonl file."""
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise UserError(f"--text={name}={pattern}: matches no files")
    docs = []
    for path in paths:
        texts = [read_text(path, user=True)]
        if path.endswith(".jsonl"):
            texts = [r.get("text") if isinstance(r, dict) else None for _, r in jsonl(path)]
            bad = next((i for (i, _), t in zip(jsonl(path), texts) if not isinstance(t, str)), None)
            if bad:
                raise UserError(f'{path}:{bad}: a corpus record needs a "text" field')
        if not all(t.strip() for t in texts):
            raise UserError(f"{path}: empty text")
        docs += texts
    return docs


def split_documents(docs, enc, max_tokens, rng):
    """Shuffles docs, sends ~10% to val, and encodes each split until its cap (val: a tenth).
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


# ----------------------------------------------------------------------------------------------
# Tasks


RECORD_BYTES = 200  # at least what one generated record takes while the data set is built (about 400 measured)


def check_records_memory(cfg, n_tasks):
    """--records and --val_records against the free memory, before any record is generated: every record of every
    built-in task is held until the data set is written."""
    need = RECORD_BYTES * n_tasks * (cfg.records + cfg.val_records * 2)  # train, val, unseen and calib (half of val)
    check_memory(need, f"--records={cfg.records} --val_records={cfg.val_records} ({n_tasks} built-in tasks)")


def user_records(name, path, seed, phrasings=()):
    """{"train": [(prompt, response)], "val", and "calib" from 20 records on (10% each); with phrasings (at least
    two instructions), calib asked in the odd ones and "unseen", val's records in the even ones. Split by record."""
    if not os.path.isfile(path):
        raise UserError(f"--task={name}={path}: no such file")
    records = []  # (prompt, response, Alpaca's (instruction, input) or None)
    for i, r in jsonl(path):
        if isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str):
            prompt, response, alpaca = r["prompt"], r["response"], None
        elif (
            isinstance(r, dict)
            and all(isinstance(r.get(k), str) for k in ("instruction", "output"))
            and isinstance(r.get("input", ""), str)
        ):
            alpaca = (r["instruction"], r.get("input", ""))
            prompt, response = alpaca_prompt(*alpaca), r["output"]
        else:
            raise UserError(
                f'{path}:{i}: a record needs "prompt" and "response", or "instruction" and "output" '
                f'(and optionally "input"), each a string'
            )
        if not prompt.strip() or not response:
            raise UserError(f"{path}:{i}: empty {'prompt' if not prompt.strip() else 'response'}")
        records.append((prompt, response, alpaca))
    if len(records) < 2:
        raise UserError(f"{path}: {len(records)} record(s); a train/val split needs at least 2")
    if phrasings:
        check_phrasings(name, path, records, phrasings)
    random.Random(f"{seed}:{name}").shuffle(records)
    n_val = min(max(1, len(records) // 10), len(records) - 1)
    n_calib = len(records) // 10 if len(records) >= 20 else 0
    val, calib, train = records[:n_val], records[n_val : n_val + n_calib], records[n_val + n_calib :]
    out = {"train": train, "val": val}
    if calib:
        out["calib"] = rephrased(calib, phrasings[0::2]) if phrasings else calib
    if phrasings:
        out["unseen"] = rephrased(val, phrasings[1::2])
    return {split: [(p, r) for p, r, *_ in rows] for split, rows in out.items()}


def alpaca_prompt(instruction, given):
    return ALPACA.format(instruction=instruction, given=f"### Input:\n{given}\n\n" if given else "")


def read_phrasings(name, path):
    """The instructions of --phrasings=NAME=FILE.txt, one per non-blank line (at least two)."""
    lines = [line.strip() for line in read_text(path, user=True).splitlines() if line.strip()]
    if len(lines) < 2:
        raise UserError(f"--phrasings={name}={path}: {len(lines)} instruction(s); at least 2, one per line")
    return lines


def check_phrasings(name, path, records, phrasings):
    """Phrasings replace an Alpaca record's instruction, and must be new to the task."""
    if any(alpaca is None for _, _, alpaca in records):
        raise UserError(
            f'--phrasings={name}=...: {path} holds "prompt" records; phrasings replace the "instruction" of Alpaca '
            "records"
        )
    used = {alpaca[0].strip() for _, _, alpaca in records}
    seen = sorted(p for p in phrasings if p in used)
    if seen:
        raise UserError(f"--phrasings={name}=...: {seen[0]!r} is an instruction of {path}; give phrasings it lacks")


def rephrased(records, phrasings):
    """Alpaca records asked in the given instructions in turn (their input and output kept)."""
    return [
        (alpaca_prompt(phrasings[i % len(phrasings)], alpaca[1]), r, None) for i, (_, r, alpaca) in enumerate(records)
    ]


def encode_records(records, enc):
    """[(prompt, response)] -> tokens uint16 (prompt, response, EOT per record), index int64 (N, 3): start,
    prompt length, length."""
    tokens, index = [], []
    for prompt, response in records:
        p, r = encode(enc, prompt), encode(enc, response) + [enc.eot_token]
        index.append((len(tokens), len(p), len(p) + len(r)))
        tokens += p + r
    return np.array(tokens, dtype=np.uint16), np.array(index, dtype=np.int64).reshape(-1, 3)


# ----------------------------------------------------------------------------------------------


def fitting_context(longest):
    """The context that fits a record of `longest` tokens (EOT included): 128, or the next multiple of 64."""
    return max(128, -(-(longest - 1) // 64) * 64)


def length_warning(name, index, context):
    """A warning about a task's records (index rows: start, prompt length, length) that do not fit a context of
    `context` tokens, where a record of n tokens, its EOT included, fills n - 1: how many, the longest, the 95th
    percentile, how many lose their whole response, and the context that fits them all. None when all fit."""
    _, n_prompt, length = index.T
    cut, lost = int((length - 1 > context).sum()), int((n_prompt > context).sum())
    if not cut:
        return None
    return (
        f"warning: task {name!r}: {cut} of {len(length)} records are longer than a context of {context} tokens and "
        f"will be cut in training (the longest needs {length.max() - 1}, the 95th percentile "
        f"{np.percentile(length - 1, 95):.0f})"
        + (f"; {lost} of them lose their whole response" if lost else "")
        + f"; a base with train_base.py --block_size={fitting_context(int(length.max()))} fits them all (demo.py "
        "picks it by itself); --context=N checks another context"
    )


def read_specs(specs, flag):
    """["NAME=PATH", ...] -> [(NAME, PATH)], names checked, each given once."""
    out = []
    for spec in specs:
        name, _, path = spec.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not path:
            raise UserError(f"--{flag}={spec}: expected NAME=PATH, NAME of letters, digits, _ and -")
        if name in dict(out):  # the second would replace the first
            raise UserError(f"--{flag}={spec}: {name} is given twice; give each its own name")
        out.append((name, path))
    return out


def check_not_builtin(specs, builtin, flag):
    """No --task or --text takes the name of a built-in task or corpus source that is built too: it would replace it."""
    for name, path in specs:
        if name in builtin:
            raise UserError(
                f"--{flag}={name}={path}: {name} is built in; give yours another name, or leave the built-in out "
                "with --only"
            )


def read_sources(cfg):
    """Reads and generates everything before anything is written, so bad input leaves old data untouched.
    -> ({corpus name: (documents, source)}, {task name: (records by split, source)})"""
    builtin = list(CORPUS) + tasks.TASKS
    names = (
        builtin
        if cfg.only == "all"
        else []
        if cfg.only == "none"
        else [n.strip() for n in cfg.only.split(",") if n.strip()]
    )
    for name in names:
        if name not in builtin:
            raise UserError(f"--only: unknown built-in {name!r}; choose from {', '.join(builtin)} (or all, none)")
    check_not_builtin(read_specs(cfg.text, "text"), [n for n in names if n in CORPUS], "text")
    check_not_builtin(read_specs(cfg.task, "task"), [n for n in names if n in tasks.TASKS], "task")
    check_records_memory(cfg, len([n for n in names if n in tasks.TASKS]))
    corpus = {n: (corpus_documents(n, cfg.seed), CORPUS[n]) for n in names if n in CORPUS}
    for name, pattern in read_specs(cfg.text, "text"):
        corpus[name] = (user_documents(name, pattern), f"user files {pattern}")
    if cfg.small_task and cfg.small_task not in names:
        raise UserError(f"--small_task={cfg.small_task}: not a built-in task being built ({', '.join(names)})")
    built = {}
    for n in [n for n in names if n in tasks.TASKS]:
        n_train = max(1, cfg.records // 10) if n == cfg.small_task else cfg.records
        family = f"{len(tasks.phrasings(n))} phrasings, {len(tasks.phrasings(n, unseen=True))} more unseen"
        built[n] = (tasks.task_splits(n, n_train, cfg.val_records, cfg.seed), f"generated (data/tasks.py): {family}")
    phrasing_files = dict(read_specs(cfg.phrasings, "phrasings"))
    phrasings = {name: read_phrasings(name, path) for name, path in phrasing_files.items()}
    for name, path in read_specs(cfg.task, "task"):
        source = f"user records {path}" + (f", phrasings {phrasing_files[name]}" if name in phrasings else "")
        built[name] = (user_records(name, path, cfg.seed, phrasings.get(name, ())), source)
    unknown = sorted(set(phrasings) - {name for name, _ in read_specs(cfg.task, "task")})
    if unknown:
        raise UserError(f"--phrasings={unknown[0]}=...: no --task={unknown[0]}=FILE.jsonl to rephrase")
    for name, (docs, _) in corpus.items():
        if len(docs) < 2:
            raise UserError(f"corpus source {name!r} has {len(docs)} document(s); a train/val split needs at least 2")
    if not corpus and not built:
        raise UserError("nothing to build: --only=none and no --task or --text given")
    return corpus, built


def check_out_dir(cfg):
    """OUT is replaced whole when the new data set is complete: it must be new, empty or an earlier data set, and
    hold none of the inputs."""
    out = cfg.out_dir
    earlier = os.path.isdir(out) and (not os.listdir(out) or os.path.isfile(os.path.join(out, "meta.json")))
    if os.path.exists(out) and not earlier:
        raise UserError(
            f"--out_dir={out} is not a data set written by prepare.py (no meta.json), and would be "
            f"replaced whole: choose a new folder"
        )
    inputs = [path for _, path in read_specs(cfg.task, "task") + read_specs(cfg.phrasings, "phrasings")]
    inputs += [p for _, pattern in read_specs(cfg.text, "text") for p in glob.glob(pattern, recursive=True)]
    inputs += [cfg.tokenizer] if os.path.isdir(cfg.tokenizer) else []  # a folder with GPT-2's tokenizer files
    check_outputs([out], inputs)


def write_corpus(folder, name, docs, source, enc, cfg):
    """A corpus source's documents split and written as <folder>/corpus/<name>/{train,val}.bin -> its meta entry."""
    splits = split_documents(docs, enc, cfg.max_tokens, random.Random(f"{cfg.seed}:{name}"))
    os.makedirs(os.path.join(folder, "corpus", name))
    for split, (tokens, _) in splits.items():
        tokens.tofile(os.path.join(folder, "corpus", name, f"{split}.bin"))
    (train, n_train), (val, n_val) = splits["train"], splits["val"]
    print(f"corpus {name:>8}: docs {n_train}/{n_val}, tokens {len(train):,}/{len(val):,} (train/val)")
    return {
        "train_tokens": len(train),
        "val_tokens": len(val),
        "train_docs": n_train,
        "val_docs": n_val,
        "source": source,
    }


def write_task(folder, name, records, source, enc, held_back, context):
    """A task's splits written as <folder>/tasks/<name>/<split>.{bin,idx}, with a warning for the records longer
    than the context -> its meta entry."""
    os.makedirs(os.path.join(folder, "tasks", name))
    info, indexes = {"source": source}, []
    for split, rows in records.items():
        tokens, index = encode_records(rows, enc)
        indexes.append(index)
        tokens.tofile(os.path.join(folder, "tasks", name, f"{split}.bin"))
        index.tofile(os.path.join(folder, "tasks", name, f"{split}.idx"))
        info.update(
            {f"{split}_records": len(rows), f"{split}_tokens": len(tokens), f"{split}_longest": int(index[:, 2].max())}
        )
    index = np.concatenate(indexes)
    lengths = index[:, 2] - 1  # the positions each record fills
    splits = "/".join(str(info[f"{split}_records"]) for split in records)
    print(
        f"task {name:>10}: records {splits} ({'/'.join(records)}), longest {lengths.max()} tokens, 95th "
        f"percentile {np.percentile(lengths, 95):.0f}, {int((lengths > context).sum())} longer than {context}"
        + (" (held back)" if held_back else "")
    )
    warning = length_warning(name, index, context)
    if warning:
        print(warning, file=sys.stderr)
    return info


def main(argv=None):
    cfg = parse_config(PrepareConfig, argv or [])
    t0 = time.time()
    check_out_dir(cfg)
    enc = get_tokenizer(cfg.tokenizer)
    if enc.n_vocab > 2**16:
        raise UserError(f"tokenizer {cfg.tokenizer!r} has {enc.n_vocab} tokens; the .bin files hold uint16 ids")
    corpus, built = read_sources(cfg)
    names = tasks.HELD_BACK if cfg.held_back == "auto" else [n.strip() for n in cfg.held_back.split(",") if n.strip()]
    held_back = [n for n in names if n in built and (cfg.held_back != "auto" or built[n][1].startswith("generated"))]
    context = cfg.context or (128 if cfg.tokenizer == "bytes" else 1024)  # the default base's, or GPT-2's
    meta = {
        "tokenizer": cfg.tokenizer,
        "vocab_size": enc.n_vocab,
        "eot": enc.eot_token,
        "seed": cfg.seed,
        "corpus": {},
        "tasks": {},
        "held_back": held_back,
        "small_task": cfg.small_task,
        "template": ALPACA,
    }

    def build(folder):
        for name, (docs, source) in corpus.items():
            meta["corpus"][name] = write_corpus(folder, name, docs, source, enc, cfg)
        for name, (records, source) in built.items():
            meta["tasks"][name] = write_task(folder, name, records, source, enc, name in held_back, context)
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)

    atomic_write(cfg.out_dir, build, folder=True)
    print(f"wrote {cfg.out_dir} in {time.time() - t0:.1f}s")
    return meta


if __name__ == "__main__":
    run(main)
