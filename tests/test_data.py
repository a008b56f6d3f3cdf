"""data/prepare.py and tokenizer.py: split hygiene, meta.json, tokenizer round trips, and one-line errors."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error
from data.prepare import arith_problems, is_test_pair
from data.prepare import main as prepare
from tokenizer import EOT, TokenizerError, encode, get_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARD_TEXT = ("naïve café — e\u0301 (combining acute), 日本語のテキスト, 한국어, emoji 🦜🧪👩‍🔬, math ∑∫√, "
             "RTL עברית, a literal <|endoftext|> in the text, tabs\tand\nnewlines  ")


def documents(data_dir, domain, split, enc):
    """The documents of one split, decoded: the token stream cut at every EOT."""
    tokens = np.fromfile(os.path.join(data_dir, domain, f"{split}.bin"), dtype=np.uint16).tolist()
    assert tokens and tokens[-1] == enc.eot_token  # every document ends with EOT
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == enc.eot_token:
            docs.append(enc.decode(tokens[start:i]))
            start = i + 1
    return docs


def test_no_document_in_both_splits(tiny_data):
    """No document of any domain is in both train and val, and the document counts match meta.json."""
    with open(os.path.join(tiny_data, "meta.json")) as f:
        meta = json.load(f)
    enc = get_tokenizer(meta["tokenizer"])
    assert set(meta["domains"]) == {"python", "cpp", "prose", "arith", "unicode"}
    for name, info in meta["domains"].items():
        train, val = documents(tiny_data, name, "train", enc), documents(tiny_data, name, "val", enc)
        assert len(train) == info["train_docs"] and len(val) == info["val_docs"]
        assert not set(train) & set(val), name


def test_meta_token_counts_equal_file_sizes(tiny_data):
    """meta.json's token counts are the .bin files' sizes in uint16 tokens; held-back domains are listed."""
    with open(os.path.join(tiny_data, "meta.json")) as f:
        meta = json.load(f)
    assert meta["held_back"] == ["unicode"] and meta["vocab_size"] == 257 and meta["eot"] == 256
    for name, info in meta["domains"].items():
        for split in ("train", "val"):
            size = os.path.getsize(os.path.join(tiny_data, name, f"{split}.bin"))
            assert size == 2 * info[f"{split}_tokens"], (name, split)


def test_arith_test_problems_never_in_training(tiny_data):
    """No line of the arith training data is a reserved test pair, so exact match measures arithmetic."""
    enc = get_tokenizer("bytes")
    lines = "".join(documents(tiny_data, "arith", "train", enc)).splitlines()
    assert len(lines) > 1000
    for line in lines:
        a, op, b, c = re.fullmatch(r"(\d+)([+-])(\d+)=(-?\d+)", line).groups()
        assert not is_test_pair(int(a), int(b)), line
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    test_lines = {p + a for p, a in arith_problems(200, seed=0, test=True)}
    assert not test_lines & set(lines)


@pytest.mark.parametrize("a, b, reserved", [(10, 9, True), (0, 0, True), (55, 5, True), (91, 1, True),
                                           (19, 1, False), (5, 5, False), (9, 1, False), (99, 9, False)])
def test_reserved_pairs_follow_the_tens_digit(a, b, reserved):
    """An (a, b) pair is reserved for evaluation exactly when a's tens digit plus b ends in 0, by hand."""
    assert is_test_pair(a, b) is reserved


def test_training_pairs_cover_every_units_sum():
    """One pair in ten is reserved, and every (units digit of a, b) combination still has training pairs."""
    pairs = [(a, b) for a in range(100) for b in range(10)]
    assert sum(is_test_pair(a, b) for a, b in pairs) == len(pairs) // 10
    assert {(a % 10, b) for a, b in pairs if not is_test_pair(a, b)} == {(u, b) for u in range(10) for b in range(10)}


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
    """A folder missing a file, or whose vocab.json disagrees with merges.txt, raises TokenizerError."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    folder = str(tmp_path / "tok")
    os.makedirs(folder)
    with pytest.raises(TokenizerError, match="merges.txt"):
        get_tokenizer(folder)
    write_gpt2_folder(folder, [(b"a", b"b")])
    with open(os.path.join(folder, "merges.txt"), "a") as f:
        f.write("c d\n")  # a merge vocab.json does not have
    with pytest.raises(TokenizerError, match="not a valid GPT-2 BPE pair"):
        get_tokenizer(folder)
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        get_tokenizer("no-such-tokenizer")


def test_gpt2_tokenizer_offline(tmp_path, monkeypatch):
    """Without network or cache, get_tokenizer("gpt2") raises a TokenizerError that names TIKTOKEN_CACHE_DIR."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):  # a closed port: offline at once
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        get_tokenizer("gpt2")
    except TokenizerError as e:
        assert "TIKTOKEN_CACHE_DIR" in str(e)
    else:
        pytest.skip("the gpt2 BPE loaded: it is cached or reachable")


def run_prepare(*args):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "data", "prepare.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_prepare_cli_missing_files(tmp_path):
    """prepare.py with a --domain glob that matches nothing exits 1 with one line on stderr and writes nothing."""
    result = run_prepare("--out", str(tmp_path / "out"), "--only", "arith", "--max_tokens", "2000",
                         "--domain", f"mine={tmp_path}/*.txt")
    assert_one_line_error(result, "matches no files")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("content, words", [
    ('{"text": "fine"}\n{not json\n', [":2:", "not valid JSON"]),
    ('{"text": "fine"}\n{"title": "no text"}\n', [":2:", '"text"']),
    ('{"text": "  "}\n{"text": "fine"}\n', [":1:", "empty"]),
])
def test_prepare_bad_jsonl(tmp_path, capsys, content, words):
    """A bad .jsonl record stops prepare.py with exit status 1 and one stderr line naming the file and line."""
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        prepare(["--out", str(tmp_path / "out"), "--only", "arith", "--max_tokens", "2000",
                 "--domain", f"mine={path}"])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}")
    for word in words:
        assert word in lines[0]


def test_prepare_user_domain_jsonl(tmp_path):
    """A .jsonl domain gives one document per record (text or Alpaca fields), split with no overlap."""
    records = [{"text": f"note number {i}: " + "x" * i} for i in range(15)]
    records += [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(5)]
    path = tmp_path / "notes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    meta = prepare(["--out", str(tmp_path / "out"), "--only", "arith", "--max_tokens", "2000",
                    "--domain", f"notes={path}"])
    info = meta["domains"]["notes"]
    assert info["train_docs"] + info["val_docs"] == 20
    enc = get_tokenizer("bytes")
    train, val = documents(tmp_path / "out", "notes", "train", enc), documents(tmp_path / "out", "notes", "val", enc)
    assert not set(train) & set(val)
    assert "### Instruction:\nsay 3\n\n### Response:\n3\n" in train + val


def test_routing_ceiling_tells_arith_from_prose(tiny_data):
    """results.routing_ceiling (a logistic regression on token and token-pair counts) tells held-out arith from prose
    windows right over 95% of the time, and lies in [0, 1] as a fraction."""
    from results import ResultsConfig, routing_ceiling
    from trainer import DomainData
    accuracy = routing_ceiling(DomainData(tiny_data, "arith,prose", 32), ResultsConfig(windows=16), bins=256, steps=100)
    assert 0.95 < accuracy <= 1.0
