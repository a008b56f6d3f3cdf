"""data/prepare.py, trainer.py's readers and tokenizer.py: split hygiene, meta.json, task records and batches,
tokenizer round trips, and one-line errors."""

import json
import os
import re

import numpy as np
import pytest
import torch

from batches import TaskData
from config import UserError
from conftest import assert_one_line_error, run_script
from data import tasks
from data.prepare import main as prepare
from tokenizer import EOT, encode, get_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARD_TEXT = (
    "naïve café — e\u0301 (combining acute), 日本語のテキスト, 한국어, emoji 🦜🧪👩‍🔬, math ∑∫√, "
    "RTL עברית, a literal <|endoftext|> in the text, tabs\tand\nnewlines  "
)


def documents(data_dir, source, split, enc):
    """The documents of one corpus split, decoded: the token stream cut at every EOT."""
    tokens = np.fromfile(os.path.join(data_dir, "corpus", source, f"{split}.bin"), dtype=np.uint16).tolist()
    assert tokens and tokens[-1] == enc.eot_token  # every document ends with EOT
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == enc.eot_token:
            docs.append(enc.decode(tokens[start:i]))
            start = i + 1
    return docs


def texts(data, name, split):
    """Every record of a task split, decoded -> [(prompt, response without its EOT)]."""
    enc = get_tokenizer(data.tokenizer)
    out = []
    for i in range(data.count(name, split)):
        prompt, response = data.record(name, split, i)
        assert response[-1] == data.eot and data.eot not in prompt + response[:-1]
        out.append((enc.decode(prompt), enc.decode(response[:-1])))
    return out


def test_no_corpus_document_in_both_splits(tiny_data):
    """No document of any corpus source is in both train and val, and the document counts match meta.json."""
    with open(os.path.join(tiny_data, "meta.json")) as f:
        meta = json.load(f)
    enc = get_tokenizer(meta["tokenizer"])
    assert set(meta["corpus"]) == {"python", "cpp", "prose", "skills"}
    for name, info in meta["corpus"].items():
        train, val = documents(tiny_data, name, "train", enc), documents(tiny_data, name, "val", enc)
        assert len(train) == info["train_docs"] and len(val) == info["val_docs"]
        assert not set(train) & set(val), name


def test_split_documents_sends_each_document_to_one_side():
    """split_documents puts about a tenth of the documents (at least one) in val and the rest in train, each
    document whole and on one side only, every one ended by EOT, when the caps hold them all."""
    import random

    from data.prepare import split_documents

    enc = get_tokenizer("bytes")
    docs = [f"document {i} " * (i % 3 + 1) for i in range(30)]
    splits = split_documents(docs, enc, 10**6, random.Random(0))
    texts = {}
    for split, (tokens, n) in splits.items():
        parts = enc.decode(tokens.tolist()).split(EOT)
        assert parts[-1] == "" and len(parts) - 1 == n
        texts[split] = parts[:-1]
    assert len(texts["val"]) == 3 and len(texts["train"]) == 27
    assert sorted(texts["val"] + texts["train"]) == sorted(docs)


def test_meta_counts_equal_file_sizes(tiny_data):
    """meta.json's corpus token counts are the .bin files' sizes in uint16 tokens, its record counts the .idx rows
    (three int64 each); the held-back task is listed."""
    with open(os.path.join(tiny_data, "meta.json")) as f:
        meta = json.load(f)
    assert meta["held_back"] == ["count"] and meta["vocab_size"] == 257 and meta["eot"] == 256
    assert set(meta["tasks"]) == {"upper", "lower", "double", "reverse", "arith", "count"}
    for name, info in meta["corpus"].items():
        for split in ("train", "val"):
            assert (
                os.path.getsize(os.path.join(tiny_data, "corpus", name, f"{split}.bin")) == 2 * info[f"{split}_tokens"]
            )
    for name, info in meta["tasks"].items():
        for split, n in (("train", 2000), ("val", 64)):
            folder = os.path.join(tiny_data, "tasks", name)
            assert info[f"{split}_records"] == n and os.path.getsize(os.path.join(folder, f"{split}.idx")) == 24 * n
            assert os.path.getsize(os.path.join(folder, f"{split}.bin")) == 2 * info[f"{split}_tokens"]


def word_in(prompt, word):
    """The word as it stands in the prompt, in any casing, as a whole word: every place it stands."""
    return re.findall(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", prompt, flags=re.IGNORECASE)


def check_word_record(name, prompt, response, words):
    """A word task's record: the prompt holds a word of `words` (in some casing) and the response is the task's
    answer for it exactly as it stands in the prompt."""
    base = {
        "upper": response.lower(),
        "lower": response,
        "double": response[::2].lower(),
        "reverse": response[::-1].lower(),
    }.get(name)
    in_prompt = [w.lower() for w in re.findall(r"[A-Za-z]+", prompt)]
    candidates = [base] if base else [w for w in in_prompt if w in words and len(w) == int(response)]
    assert candidates and candidates[0] in words, (name, prompt, response)
    typed = word_in(prompt, candidates[0])
    assert any(tasks.WORD_TASKS[name](t) == response for t in typed), (name, prompt, response)


def arith_pair(prompt, response, val):
    """An arith record: two numbers a, b of 0..99 whose sum or difference (in either order, as "subtract b from
    a" puts them) is the response, and the pair is one kept for validation exactly when val."""
    n1, n2 = map(int, re.findall(r"\d+", prompt))
    options = [(a, b) for a, b in ((n1, n2), (n2, n1)) if str(a + b) == response or str(a - b) == response]
    assert options, prompt
    assert any(tasks.is_val_pair(a, b) == val for a, b in options), prompt


def test_task_records_are_right_and_validation_is_unseen(tiny_data):
    """Every record of every built-in task ends its prompt with a newline and answers its word (or sum) right;
    no word of a validation, unseen or calib record occurs in a training record, and no reserved arith pair is
    trained on."""
    data = TaskData(tiny_data, ",".join(tasks.TASKS))
    train_words, val_words = tasks.words(1337)
    assert len(train_words) > 500 and len(val_words) > 100 and not set(train_words) & set(val_words)
    for name in data.domains:
        for split in ("train", "val", "unseen", "calib"):
            words = set(train_words if split == "train" else val_words)
            for prompt, response in texts(data, name, split):
                assert prompt.endswith("\n") and response, (prompt, response)
                if name == "arith":
                    arith_pair(prompt, response, split != "train")
                else:
                    check_word_record(name, prompt, response, words)


def test_answers_and_hand_written_prompts():
    """The word tasks' answers by hand, and every hand-written prompt (8 or more per task) answered right."""
    assert [tasks.WORD_TASKS[n]("Spam") for n in ("upper", "lower", "double", "reverse", "count")] == [
        "SPAM",
        "spam",
        "SSppaamm",
        "mapS",
        "4",
    ]
    for name, prompts in tasks.HAND_WRITTEN.items():
        assert len(prompts) >= 8 and len({p for p, _ in prompts}) == len(prompts), name
        for prompt, answer in prompts:
            if name == "arith":
                a, b = map(int, re.findall(r"\d+", prompt))
                assert answer in (str(a + b), str(a - b), str(b - a)), prompt
            else:
                words = [w for w in re.findall(r"[A-Za-z]+", prompt) if tasks.WORD_TASKS[name](w) == answer]
                assert words, (name, prompt, answer)


def test_phrasing_families_are_disjoint_and_share_their_styles(tiny_data):
    """Each task's training family has at least 30 phrasings and its unseen family at least 10 more, none in both;
    and no task owns a style: every word task's training prompts show each input casing (lower, Title, UPPER),
    each quote, instructions in capitals, and the word before and after the instruction."""
    for name in tasks.TASKS:
        seen, unseen = set(tasks.phrasings(name)), set(tasks.phrasings(name, unseen=True))
        assert len(seen) >= 30 and len(unseen) >= 10 and not seen & unseen, name
    data = TaskData(tiny_data, ",".join(tasks.TASKS))
    for name in ("upper", "lower", "double", "reverse", "count"):
        prompts = [p for p, _ in texts(data, name, "train")]
        for quote in ("'", '"', "`"):
            assert any(quote in p for p in prompts), (name, quote)
        assert any(re.search(r"\b[A-Z]{5,} [A-Z]{2,}", p) for p in prompts), name  # an instruction in capitals
        assert any(p.startswith(("Word:", "`", "'", '"')) or "\n" in p[:-1] for p in prompts), name  # word first
        for casing in (str.islower, str.istitle, str.isupper):
            assert any(casing(w) for p in prompts for w in re.findall(r"[A-Za-z]{3,}", p)[-1:]), name


def test_skills_text_holds_no_validation_word_or_pair():
    """The skills text (the base's corpus source `skills`) pairs training words with their transformations and
    training sums with their results, one kind per document, and never shows a validation word or pair."""
    train_words, val_words = tasks.words(1337)
    val, train = set(val_words), set(train_words)
    for doc in tasks.skill_documents(1337, n_docs=14, lines=20):
        lines = doc.strip().split("\n")
        assert len(lines) == 20
        kinds = set(tasks.WORD_TASKS) | {"+", "-"}  # the kinds every line so far can be
        titles = [line for line in lines if line.endswith(":")]  # every 10 lines or so, naming the transformation
        assert lines[0] in titles and len(titles) >= len(lines) // 11
        for line in [line for line in lines if line not in titles]:
            if "=" in line:
                a, op, b, _, c = line.split()
                assert not tasks.is_val_pair(int(a), int(b))
                assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
                kinds &= {op}
            else:
                word, result = line.split()
                assert word.lower() not in val and word.lower() in train
                kinds &= {n for n, f in tasks.WORD_TASKS.items() if f(word) == result}
        assert kinds, doc  # one kind explains every line of the document


def test_padded_batch_takes_the_loss_on_responses_only(tiny_data):
    """A task batch: x is each record shifted right-padded, y the next tokens; with the default, prompt targets and
    padding carry no loss (-1); with prompt_loss every real target does; `prompt` marks exactly the prompt tokens;
    the batch is balanced over tasks (counts differ by at most one)."""
    for prompt_loss in (False, True):
        data = TaskData(tiny_data, "arith,reverse,double", 128, prompt_loss)
        batch = data.batch(7, 0)
        assert sorted(torch.bincount(batch.domain, minlength=3).tolist()) == [2, 2, 3]
        T = batch.x.size(1)
        for b in range(7):
            name = data.domains[int(batch.domain[b])]
            record = next(
                (p, r)
                for p, r in (data.record(name, "train", i) for i in range(data.count(name, "train")))
                if (p + r)[:-1] == batch.x[b, : len(p) + len(r) - 1].tolist()
            )
            p, r = record
            n = len(p) + len(r) - 1
            assert batch.x[b, n:].tolist() == [data.eot] * (T - n)
            assert batch.prompt[b].tolist() == [True] * len(p) + [False] * (T - len(p))
            expected = (p + r)[1:] if prompt_loss else [-1] * (len(p) - 1) + r
            assert batch.y[b].tolist() == expected + [-1] * (T - n)


def test_user_task_jsonl_forms(tmp_path):
    """A user task from .jsonl: {"prompt","response"} records are kept as they are, Alpaca records become the fixed
    template (no Input section when input is empty); records split into train and val with none in both."""
    records = [{"prompt": f"Q{i}: ", "response": f"A{i}"} for i in range(12)]
    records += [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")  # blank lines are allowed
    prepare([f"--out_dir={tmp_path / 'out'}", "--only=none", f"--task=mine={path}"])
    data = TaskData(str(tmp_path / "out"), "mine")
    train, val = texts(data, "mine", "train"), texts(data, "mine", "val")
    assert len(train) + len(val) == 14 and len(val) == 1 and not set(train) & set(val)
    got = set(train + val)
    assert ("Q3: ", "A3") in got
    assert ("### Instruction:\nSay hi\n\n### Response:\n", "hi") in got
    assert ("### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n", "5") in got


@pytest.mark.parametrize(
    "a, b, reserved", [(10, 9, True), (0, 0, True), (55, 5, True), (91, 1, True), (19, 1, False), (99, 9, False)]
)
def test_reserved_pairs_by_hand(a, b, reserved):
    """An (a, b) pair is kept for validation exactly when a's tens digit plus b ends in 0, by hand."""
    assert tasks.is_val_pair(a, b) is reserved


def test_training_pairs_cover_every_units_sum():
    """One pair in ten is kept for validation, and every (units digit of a, b) combination still has training
    pairs."""
    pairs = [(a, b) for a in range(100) for b in range(10)]
    assert sum(tasks.is_val_pair(a, b) for a, b in pairs) == len(pairs) // 10
    assert {(a % 10, b) for a, b in pairs if not tasks.is_val_pair(a, b)} == {
        (u, b) for u in range(10) for b in range(10)
    }


def test_byte_tokenizer_round_trip():
    """The byte tokenizer round-trips any Unicode text, and "<|endoftext|>" written in text stays text."""
    enc = get_tokenizer("bytes")
    ids = encode(enc, HARD_TEXT)
    assert ids == list(HARD_TEXT.encode("utf-8")) and enc.eot_token not in ids
    assert enc.decode(ids) == HARD_TEXT
    assert enc.n_vocab == 257 and enc.encode(EOT, allowed_special="all") == [256]


def byte_to_char():
    """GPT-2's printable stand-in for each byte, in tiktoken's rank order: printable bytes keep their
    character, the others (control bytes, space, ...) map to chr(256), chr(257), ... in byte order."""
    kept = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(moved)}}, kept + moved


def write_gpt2_folder(folder, merges):
    """A tiny valid GPT-2 tokenizer folder: the 256 byte tokens, `merges` (pairs of byte strings), EOT."""
    char, order = byte_to_char()
    show = lambda bs: "".join(char[b] for b in bs)  # noqa: E731
    vocab = {show([b]): i for i, b in enumerate(order)}
    for a, b in merges:
        vocab[show(a + b)] = len(vocab)
    vocab[EOT] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{show(a)} {show(b)}\n" for a, b in merges))


def test_gpt2_tokenizer_from_folder_round_trip(tmp_path, monkeypatch):
    """A GPT-2 BPE read from vocab.json + merges.txt applies the merges and round-trips any Unicode text."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    merges = [(b"h", b"e"), (b"l", b"l"), (b" ", b"w"), (b"he", b"ll"), (b"\xe6", b"\x97")]
    write_gpt2_folder(tmp_path / "tok", merges)
    enc = get_tokenizer(str(tmp_path / "tok"))
    assert enc.n_vocab == 256 + len(merges) + 1 and enc.eot_token == 256 + len(merges)
    assert encode(enc, "hello world") == [259, enc.encode_single_token(b"o"), 258] + encode(enc, "orld")
    ids = encode(enc, HARD_TEXT)
    assert enc.decode(ids) == HARD_TEXT and enc.eot_token not in ids


def test_gpt2_tokenizer_folder_rereads_edited_files(tmp_path, monkeypatch):
    """Regression: editing the files of a tokenizer folder changes the tokenizer (tiktoken caches by path)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    folder = str(tmp_path / "tok")
    write_gpt2_folder(folder, [(b"a", b"b")])
    assert get_tokenizer(folder).n_vocab == 258
    write_gpt2_folder(folder, [(b"a", b"b"), (b"c", b"d")])
    assert get_tokenizer(folder).n_vocab == 259


def test_gpt2_tokenizer_folder_errors(tmp_path, monkeypatch):
    """A folder missing a file, or whose vocab.json disagrees with merges.txt, raises UserError."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    folder = str(tmp_path / "tok")
    os.makedirs(folder)
    with pytest.raises(UserError, match="merges.txt"):
        get_tokenizer(folder)
    write_gpt2_folder(folder, [(b"a", b"b")])
    with open(os.path.join(folder, "merges.txt"), "a") as f:
        f.write("c d\n")  # a merge vocab.json does not have
    with pytest.raises(UserError, match="not a valid GPT-2 BPE pair"):
        get_tokenizer(folder)
    with pytest.raises(UserError, match="unknown tokenizer"):
        get_tokenizer("no-such-tokenizer")


def test_gpt2_tokenizer_offline(tmp_path, monkeypatch):
    """Without network or cache, get_tokenizer("gpt2") raises a UserError that names TIKTOKEN_CACHE_DIR."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):  # a closed port: offline at once
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        get_tokenizer("gpt2")
    except UserError as e:
        assert "TIKTOKEN_CACHE_DIR" in str(e)
    else:
        pytest.skip("the gpt2 BPE loaded: it is cached or reachable")


def run_prepare(*args):
    return run_script("data/prepare.py", *args, timeout=60)


def test_prepare_cli_missing_files(tmp_path):
    """prepare.py with a --text glob that matches nothing exits 1 with one line on stderr and writes nothing."""
    result = run_prepare(
        f"--out_dir={tmp_path / 'out'}",
        "--only=arith",
        "--records=20",
        "--val_records=2",
        f"--text=mine={tmp_path}/*.txt",
    )
    assert_one_line_error(result, "matches no files")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"prompt": "a", "response": "b"}\n{not json\n', [":2:", "not valid JSON"]),
        ('{"prompt": "a", "response": "b"}\n{"title": "no text"}\n', [":2:", '"prompt" and "response"']),
        ('{"prompt": "  ", "response": "b"}\n{"prompt": "a", "response": "b"}\n', [":1:", "empty prompt"]),
        ('{"prompt": "a", "response": ""}\n', [":1:", "empty response"]),
        ('{"instruction": "a", "input": 3, "output": "b"}\n', [":1:", "each a string"]),
        ('{"prompt": "a", "response": "b"}\n', ["1 record"]),
    ],
)
def test_prepare_bad_jsonl(tmp_path, content, words):
    """A bad .jsonl record stops prepare.py with a one-line UserError naming the file and line, and writes nothing."""
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError) as e:
        prepare([f"--out_dir={tmp_path / 'out'}", "--only=none", f"--task=mine={path}"])
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path))
    for word in words:
        assert word in message
    assert not os.path.exists(tmp_path / "out")


def test_prepare_failure_leaves_the_old_data_whole(tmp_path):
    """A prepare.py that fails (a bad user task) leaves the data folder it would have replaced exactly as it was."""
    out = tmp_path / "out"
    prepare([f"--out_dir={out}", "--only=arith", "--records=20", "--val_records=2"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(UserError):
        prepare([f"--out_dir={out}", "--only=arith", "--records=30", "--val_records=2", f"--task=bad={bad}"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "out"]  # no temporary folder left behind
