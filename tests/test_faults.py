"""Corrupt files (issue 15): every loader, given each file of a corpus of corrupt ones that the tests generate,
stops with one UserError naming the file; no pickled code is executed, and nothing is allocated from a size a
file claims before it is checked against what the file holds.

The loaders: expert and bundle files, checkpoints (a base, a resumed run), a data set's meta.json, .bin and
.idx files, GPT-2 folders, PEFT folders, config files, a user's .jsonl and text files, prompt files.
"""

import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

import export
import sample
import train_base
from batches import CorpusData, TaskData
from config import UserError, parse_config
from conftest import REPO_ROOT, TINY_BASE_ARGS
from data.prepare import main as prepare
from files import add_expert_file, expert_tensors, fingerprint, load_base, load_bundle, save_bundle, save_expert
from moa import MoA, add_experts
from model import GPT, GPTConfig
from trainer import TrainConfig


@contextmanager
def one_error(name):
    """The block raises a UserError whose message, one line, names `name` (a file, a flag)."""
    with pytest.raises(UserError, match=re.escape(name)) as e:
        yield
    assert "\n" not in str(e.value), str(e.value)


class Boom:
    """A pickle that would run code when loaded: it creates the file named by MARKER."""

    def __reduce__(self):
        return (open, (os.environ["NANOMOA_FAULTS_MARKER"], "w"))


def malicious_pickle(tmp_path):
    marker = str(tmp_path / "executed")
    os.environ["NANOMOA_FAULTS_MARKER"] = marker
    return pickle.dumps({"model": Boom(), "meta": "{}"}, protocol=2), marker


def tiny_hf_folder(folder, **sizes):
    """A GPT-2 folder as Hugging Face writes one (config.json, model.safetensors) of a tiny random GPT."""
    torch.manual_seed(0)
    config = GPTConfig(**{**dict(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=16), **sizes})
    gpt = GPT(config)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(export.hf_config(config, torch.float32), f)
    save_file(export.hf_state(gpt), os.path.join(folder, "model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def valid(tiny_base, tmp_path_factory):
    """Valid files to corrupt: an expert and a bundle on tiny_base, a GPT-2 folder, a PEFT adapter on it."""
    return valid_files(tiny_base, tmp_path_factory.mktemp("valid"))


def valid_files(tiny_base, folder):
    """The files of the fixture valid, written into folder."""
    gpt, tokenizer = load_base(tiny_base)
    base = fingerprint(gpt)
    expert = str(folder / "expert.safetensors")
    save_expert(expert, add_experts(gpt, 1, rank=2), 0, "arith", tokenizer, base)
    bundle = str(folder / "bundle.safetensors")
    save_bundle(bundle, MoA(load_base(tiny_base)[0], ["arith", "upper"], rank=2), tokenizer, base, {"top_k": 1})
    gpt2 = tiny_hf_folder(folder / "gpt2")
    peft = str(folder / "peft")
    model = add_experts(load_base(gpt2)[0], 1, rank=2)
    export.write_peft(peft, expert_tensors(model, 0), {"rank": 2, "alpha": 4.0, "targets": list(export.TARGETS)}, gpt2)
    return {"base": tiny_base, "expert": expert, "bundle": bundle, "gpt2": gpt2, "peft": peft}


def read_st(path):
    """-> (tensors, nanoMoA metadata dict) of a valid file, read with the safetensors package itself."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["nanomoa"])


def header(entries, metadata=None):
    """Raw safetensors bytes of a header naming `entries` {name: (dtype, shape, [start, end])} and no data."""
    head = {name: {"dtype": d, "shape": s, "data_offsets": o} for name, (d, s, o) in entries.items()}
    if metadata is not None:
        head["__metadata__"] = metadata
    text = json.dumps(head).encode()
    return struct.pack("<Q", len(text)) + text


# Each corrupt file: (id, how to make it from a valid one's bytes, tensors and metadata). A maker returns the
# bytes to write, or None to write nothing (the path is then missing, or a folder when the id says so).
def edit_meta(**changes):
    """A maker: the valid file with these metadata keys changed (None: removed)."""

    def make(raw, tensors, meta):
        meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
        return safetensors_bytes(tensors, {"nanomoa": json.dumps(meta)})

    return make


def edit_tensors(change):
    """A maker: the valid file with its tensors changed by change(tensors) (in place)."""

    def make(raw, tensors, meta):
        tensors = dict(tensors)
        change(tensors)
        return safetensors_bytes(tensors, {"nanomoa": json.dumps(meta)})

    return make


def first(tensors):
    return sorted(tensors)[0]


def torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


SAFETENSORS_CORRUPT = [  # what any .safetensors file can be
    ("missing", lambda raw, t, m: None),
    ("a folder", lambda raw, t, m: None),
    ("empty", lambda raw, t, m: b""),
    ("random bytes", lambda raw, t, m: bytes(range(256)) * 4),
    ("truncated", lambda raw, t, m: raw[: len(raw) // 2]),
    ("data cut by one byte", lambda raw, t, m: raw[:-1]),
    ("header length beyond the file", lambda raw, t, m: struct.pack("<Q", 2**60) + raw[8:]),
    ("header length zero", lambda raw, t, m: struct.pack("<Q", 0) + raw[8:]),
    ("header not JSON", lambda raw, t, m: struct.pack("<Q", 9) + b"not json{"),
    ("header a JSON list", lambda raw, t, m: struct.pack("<Q", 2) + b"[]"),
    ("tensor beyond the file", lambda raw, t, m: header({"a": ("F32", [4], [0, 16])})),
    ("huge tensor claimed", lambda raw, t, m: header({"a": ("F32", [10**6, 10**6], [0, 4 * 10**12])})),
    ("unknown dtype", lambda raw, t, m: header({"a": ("Q7", [1], [0, 0])})),
    ("a pickle", lambda raw, t, m: pickle.dumps({"tensors": list(t)})),
    ("a torch.save file", lambda raw, t, m: torch_bytes(t)),
]
META_CORRUPT = [  # an expert or bundle whose nanoMoA metadata is wrong
    ("no metadata", lambda raw, t, m: safetensors_bytes(t)),
    ("metadata not JSON", lambda raw, t, m: safetensors_bytes(t, {"nanomoa": "{"})),
    ("metadata a list", lambda raw, t, m: safetensors_bytes(t, {"nanomoa": "[]"})),
    ("kind missing", edit_meta(kind=None)),
    ("rank missing", edit_meta(rank=None)),
    ("rank a string", edit_meta(rank="2")),
    ("rank zero", edit_meta(rank=0)),
    ("rank a bool", edit_meta(rank=True)),
    ("rank huge", edit_meta(rank=10**9)),
    ("rank not the tensors'", edit_meta(rank=3)),
    ("alpha a string", edit_meta(alpha="x")),
    ("alpha nan", edit_meta(alpha=float("nan"))),
    ("targets empty", edit_meta(targets=[])),
    ("targets unknown", edit_meta(targets=["attn.c_q"])),
    ("targets repeated", edit_meta(targets=["attn.c_attn", "attn.c_attn"])),
    ("targets a string", edit_meta(targets="attn.c_attn")),
    ("targets fewer than the tensors'", edit_meta(targets=["attn.c_attn"])),
    ("tokenizer a number", edit_meta(tokenizer=5)),
    ("tokenizer another", edit_meta(tokenizer="gpt2")),
    ("base missing", edit_meta(base=None)),
    ("base a string", edit_meta(base="abc")),
    ("base another sha", edit_meta(base={"config": {}, "sha256": "0" * 64})),
    ("samples a string", edit_meta(samples="many")),
    ("a tensor missing", edit_tensors(lambda t: t.pop(first(t)))),
    ("a tensor extra", edit_tensors(lambda t: t.update(extra=torch.zeros(2)))),
    ("a tensor of another shape", edit_tensors(lambda t: t.update({first(t): torch.zeros(3, 3)}))),
    ("a tensor of integers", edit_tensors(lambda t: t.update({first(t): t[first(t)].long()}))),
]
EXPERT_CORRUPT = (
    SAFETENSORS_CORRUPT
    + META_CORRUPT
    + [
        ("kind bundle", edit_meta(kind="bundle")),
        ("domain empty", edit_meta(domain="")),
        ("domain a number", edit_meta(domain=3)),
    ]
)
BUNDLE_CORRUPT = (
    SAFETENSORS_CORRUPT
    + META_CORRUPT
    + [
        ("kind expert", edit_meta(kind="expert")),
        ("domains a string", edit_meta(domains="arith")),
        ("domains repeated", edit_meta(domains=["arith", "arith"])),
        ("domains more than the experts", edit_meta(domains=["arith", "upper", "reverse"])),
        ("domains a thousand", edit_meta(domains=[f"d{i}" for i in range(1000)])),
        ("pooling unknown", edit_meta(pooling="max")),
        ("top_k zero", edit_meta(top_k=0)),
        ("top_k a string", edit_meta(top_k="2")),
    ]
)


def write_corrupt(path, make, valid_path, case):
    """Writes the corrupt file `case` made from the valid file at valid_path -> its path."""
    with open(valid_path, "rb") as f:
        raw = f.read()
    tensors, meta = read_st(valid_path)
    if case == "a folder":
        os.makedirs(path)
    else:
        data = make(raw, tensors, meta)
        if data is not None:
            with open(path, "wb") as f:
                f.write(data)
    return str(path)


@pytest.mark.parametrize("case, make", EXPERT_CORRUPT, ids=[c for c, _ in EXPERT_CORRUPT])
def test_corrupt_expert_is_one_error_naming_the_file(valid, tmp_path, case, make):
    """Loading a corrupt expert file (sample.py --expert, export.py, train_lora.py --init_expert) is a UserError
    naming the file, raised before any expert is added to the model."""
    path = write_corrupt(tmp_path / "bad.safetensors", make, valid["expert"], case)
    gpt, tokenizer = load_base(valid["base"])
    with one_error("bad.safetensors"):
        add_expert_file(gpt, path, tokenizer)
    assert not any("lora_" in name for name, _ in gpt.named_parameters())


@pytest.mark.parametrize("case, make", BUNDLE_CORRUPT, ids=[c for c, _ in BUNDLE_CORRUPT])
def test_corrupt_bundle_is_one_error_naming_the_file(valid, tmp_path, case, make):
    """Loading a corrupt bundle (sample.py --bundle, train_router.py --bundle, export.py bundle) is a UserError
    naming the file."""
    path = write_corrupt(tmp_path / "bad.safetensors", make, valid["bundle"], case)
    gpt, tokenizer = load_base(valid["base"])
    with one_error("bad.safetensors"):
        load_bundle(path, gpt, tokenizer)


def test_valid_files_load(valid):
    """The files the corrupt ones are made from load: every error above comes from the corruption."""
    gpt, tokenizer = load_base(valid["base"])
    add_expert_file(gpt, valid["expert"], tokenizer)
    load_bundle(valid["bundle"], load_base(valid["base"])[0], tokenizer)
    load_base(valid["gpt2"])


# ----------------------------------------------------------------------------------------------
# Checkpoints: a base (--base, resume)


def edit_ckpt(change):
    """A maker: the valid checkpoint, loaded, changed by change(ckpt) (meta decoded to a dict), and saved."""

    def make(ckpt, tmp_path):
        ckpt = {**ckpt, "meta": json.loads(ckpt["meta"]), "model": dict(ckpt["model"])}
        change(ckpt)
        if isinstance(ckpt.get("meta"), dict):
            ckpt["meta"] = json.dumps(ckpt["meta"])
        return ckpt

    return make


def model_config(**changes):
    return edit_ckpt(lambda c: c["meta"]["model"].update(changes))


CKPT_CORRUPT = [
    ("missing", None),
    ("a folder", None),
    ("empty", b""),
    ("random bytes", bytes(range(256)) * 4),
    ("truncated", "half"),
    ("a malicious pickle", "pickle"),
    ("a list", [1, 2]),
    ("meta missing", edit_ckpt(lambda c: c.pop("meta"))),
    ("meta not JSON", lambda ckpt, tmp: {**ckpt, "meta": "{"}),
    ("meta a JSON list", lambda ckpt, tmp: {**ckpt, "meta": "[]"}),
    ("model missing", edit_ckpt(lambda c: c.pop("model"))),
    ("model not tensors", edit_ckpt(lambda c: c.update(model={"w": 1}))),
    ("kind expert", edit_ckpt(lambda c: c["meta"].update(kind="expert"))),
    ("tokenizer missing", edit_ckpt(lambda c: c["meta"].pop("tokenizer"))),
    ("config missing", edit_ckpt(lambda c: c["meta"].pop("model"))),
    ("config key missing", edit_ckpt(lambda c: c["meta"]["model"].pop("n_head"))),
    ("config key unknown", model_config(n_heads=2)),
    ("n_embd a string", model_config(n_embd="32")),
    ("n_embd zero", model_config(n_embd=0)),
    ("n_embd huge", model_config(n_embd=3200, n_head=2)),
    ("n_head not dividing n_embd", model_config(n_head=3)),
    ("n_layer more than its blocks", model_config(n_layer=40)),
    ("n_layer a thousand million", model_config(n_layer=10**9)),
    ("block_size not its positions", model_config(block_size=65)),
    ("vocab_size not its embedding", model_config(vocab_size=1000)),
    ("dropout 2", model_config(dropout=2.0)),
    ("bias a string", model_config(bias="yes")),
    ("a tensor of another shape", edit_ckpt(lambda c: c["model"].update({"transformer.ln_f.weight": torch.ones(3)}))),
]


def write_ckpt(path, make, valid_ckpt, tmp_path):
    """Writes the corrupt checkpoint `make` describes -> (its path, the marker a malicious pickle would create)."""
    marker = None
    if make == "half":
        with open(valid_ckpt, "rb") as f:
            raw = f.read()
        path.write_bytes(raw[: len(raw) // 2])
    elif make == "pickle":
        data, marker = malicious_pickle(tmp_path)
        path.write_bytes(data)
    elif isinstance(make, bytes):
        path.write_bytes(make)
    elif isinstance(make, list):
        torch.save(make, path)
    elif make is not None:
        torch.save(make(torch.load(valid_ckpt, weights_only=True), tmp_path), path)
    return str(path), marker


@pytest.mark.parametrize("case, make", CKPT_CORRUPT, ids=[c for c, _ in CKPT_CORRUPT])
def test_corrupt_base_checkpoint_is_one_error_naming_the_file(valid, tmp_path, case, make):
    """--base=ckpt.pt (every later stage) with a corrupt checkpoint is a UserError naming the file; a malicious
    pickle is refused without running its code."""
    folder = tmp_path / "base"
    folder.mkdir()
    if case == "a folder":
        (folder / "ckpt.pt").mkdir()
    path, marker = write_ckpt(folder / "ckpt.pt", make, valid["base"], tmp_path)
    with one_error("ckpt.pt"):
        load_base(path)
    assert marker is None or not os.path.exists(marker)


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "a malicious pickle",
        "meta a JSON list",
        "n_embd huge",
        "n_layer a thousand million",
        "step beyond max_iters",
        "step a string",
        "optimizer a list",
        "optimizer missing",
    ],
)
def test_corrupt_checkpoint_on_resume_is_one_error(valid, tiny_data, tmp_path, case):
    """train_base.py --init_from=resume over a corrupt out_dir/ckpt.pt is a UserError naming it (a step beyond
    --max_iters would otherwise never reach the last step)."""
    makes = dict(CKPT_CORRUPT)
    makes.update(
        {
            "step beyond max_iters": edit_ckpt(lambda c: c["meta"].update(step=10**6)),
            "step a string": edit_ckpt(lambda c: c["meta"].update(step="5")),
            "optimizer a list": edit_ckpt(lambda c: c.update(optimizer=[1, 2])),
            "optimizer missing": edit_ckpt(lambda c: c.pop("optimizer")),
        }
    )
    valid_ckpt = str(tmp_path / "valid.pt")
    shutil.copy(valid["base"], valid_ckpt)
    out = tmp_path / "run"
    out.mkdir()
    path, marker = write_ckpt(out / "ckpt.pt", makes[case], valid_ckpt, tmp_path)
    with one_error("ckpt.pt"):
        train_base.main(
            TINY_BASE_ARGS + [f"--data_dir={tiny_data}", f"--out_dir={out}", "--init_from=resume", "--max_iters=200"]
        )
    assert marker is None or not os.path.exists(marker)


# ----------------------------------------------------------------------------------------------
# A data set: meta.json, corpus .bin, task .bin and .idx


def small_data(folder):
    """A data set written by hand as data/prepare.py lays it out: corpus source c, task t."""
    meta = {
        "tokenizer": "bytes",
        "vocab_size": 257,
        "eot": 256,
        "held_back": [],
        "seed": 1,
        "corpus": {"c": {}},
        "tasks": {"t": {}},
    }
    for split in ("train", "val"):
        os.makedirs(folder / "corpus" / "c", exist_ok=True)
        (np.arange(300) % 256).astype(np.uint16).tofile(folder / "corpus" / "c" / f"{split}.bin")
        os.makedirs(folder / "tasks" / "t", exist_ok=True)
        np.array([65, 66, 67, 256] * 4, dtype=np.uint16).tofile(folder / "tasks" / "t" / f"{split}.bin")
        np.array([[4 * i, 2, 4] for i in range(4)], dtype=np.int64).tofile(folder / "tasks" / "t" / f"{split}.idx")
    (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


def set_meta(**changes):
    def make(folder):
        meta = json.loads((folder / "meta.json").read_text())
        meta.update(changes)
        (folder / "meta.json").write_text(json.dumps(meta))

    return make


def write(rel, data):
    """A maker: file rel of the data set gets these bytes (or becomes a folder, for data=None)."""

    def make(folder):
        path = folder / rel
        os.remove(path)
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)

    return make


def tokens(*ids, dtype=np.uint16):
    return np.array(ids, dtype=dtype).tobytes()


DATA_CORRUPT = [
    ("meta.json missing", lambda f: os.remove(f / "meta.json"), "meta.json"),
    ("meta.json a folder", write("meta.json", None), "meta.json"),
    ("meta.json empty", write("meta.json", b""), "meta.json"),
    ("meta.json not JSON", write("meta.json", b"{'tokenizer': 1"), "meta.json"),
    ("meta.json not UTF-8", write("meta.json", b'{"tokenizer": "\xff"}'), "meta.json"),
    ("meta.json a list", write("meta.json", b"[]"), "meta.json"),
    ("tokenizer missing", set_meta(tokenizer=None), "meta.json"),
    ("vocab_size a string", set_meta(vocab_size="257"), "meta.json"),
    ("vocab_size zero", set_meta(vocab_size=0), "meta.json"),
    ("eot beyond the vocabulary", set_meta(eot=257), "meta.json"),
    ("corpus a list", set_meta(corpus=["c"]), "meta.json"),
    ("held_back a string", set_meta(held_back="t"), "meta.json"),
    ("corpus .bin odd", write("corpus/c/train.bin", b"\x01\x00\x02"), "train.bin"),
    ("corpus .bin empty", write("corpus/c/val.bin", b""), "val.bin"),
    ("corpus .bin a folder", write("corpus/c/train.bin", None), "train.bin"),
    ("corpus .bin missing", lambda f: os.remove(f / "corpus" / "c" / "val.bin"), "val.bin"),
    ("corpus token beyond the vocabulary", write("corpus/c/train.bin", tokens(*range(250, 300))), "train.bin"),
    ("task .bin odd", write("tasks/t/train.bin", b"\x41\x00\x42"), "train.bin"),
    ("task .bin a folder", write("tasks/t/val.bin", None), "val.bin"),
    ("task token beyond the vocabulary", write("tasks/t/train.bin", tokens(65, 66, 9999, 256) * 4), "train.bin"),
    ("task .idx empty", write("tasks/t/train.idx", b""), "train.idx"),
    ("task .idx not rows of 3", write("tasks/t/train.idx", tokens(0, 2, 4, 4, dtype=np.int64)), "train.idx"),
    ("task .idx a negative start", write("tasks/t/train.idx", tokens(-4, 2, 4, dtype=np.int64)), "train.idx"),
    ("task .idx beyond the .bin", write("tasks/t/val.idx", tokens(0, 2, 4, 14, 2, 4, dtype=np.int64)), "val.idx"),
    ("task .idx prompt as long as the record", write("tasks/t/val.idx", tokens(0, 4, 4, dtype=np.int64)), "val.idx"),
    ("task .idx missing", lambda f: os.remove(f / "tasks" / "t" / "train.idx"), "train.idx"),
]


@pytest.mark.parametrize("case, make, name", DATA_CORRUPT, ids=[c for c, _, _ in DATA_CORRUPT])
def test_corrupt_data_is_one_error_naming_the_file(tmp_path, case, make, name):
    """Reading a data set with a corrupt meta.json, .bin or .idx (every training stage) is a UserError naming the
    file; tokens beyond the vocabulary are caught here, not as an index error inside the model."""
    folder = tmp_path / "data"
    small_data(folder)
    CorpusData(str(folder), "c", block_size=8)  # the valid set loads
    TaskData(str(folder), "t")
    make(folder)
    with one_error(name):
        if "corpus" in case:
            CorpusData(str(folder), "c", block_size=8)
        else:
            TaskData(str(folder), "t")


# ----------------------------------------------------------------------------------------------
# GPT-2 folders (--base=FOLDER, train_base.py --init_from=FOLDER)


def hf_config(**changes):
    def make(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return make


def pytorch_bin(content):
    def make(folder):
        os.remove(folder / "model.safetensors")
        if content == "pickle":
            data, _ = malicious_pickle(folder)
            (folder / "pytorch_model.bin").write_bytes(data)
        elif isinstance(content, bytes):
            (folder / "pytorch_model.bin").write_bytes(content)
        else:
            torch.save(content, folder / "pytorch_model.bin")

    return make


GPT2_CORRUPT = [
    ("config.json missing", lambda f: os.remove(f / "config.json"), "config.json"),
    ("config.json empty", lambda f: (f / "config.json").write_text(""), "config.json"),
    ("config.json not JSON", lambda f: (f / "config.json").write_text("{n_embd: 16}"), "config.json"),
    ("config.json a list", lambda f: (f / "config.json").write_text("[16]"), "config.json"),
    ("config.json a folder", lambda f: (os.remove(f / "config.json"), os.mkdir(f / "config.json")), "config.json"),
    ("n_embd missing", hf_config(n_embd=None), "config.json"),
    ("n_embd a string", hf_config(n_embd="16"), "config.json"),
    ("n_embd negative", hf_config(n_embd=-16), "config.json"),
    ("n_embd huge", hf_config(n_embd=3200), "config.json"),
    ("n_head not dividing n_embd", hf_config(n_head=3), "config.json"),
    ("n_layer more than its blocks", hf_config(n_layer=12), "config.json"),
    ("n_positions beyond its positions", hf_config(n_positions=10**7), "config.json"),
    ("vocab_size beyond its embedding", hf_config(vocab_size=50257), "config.json"),
    ("weights missing", lambda f: os.remove(f / "model.safetensors"), "model.safetensors"),
    (
        "weights truncated",
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
        "model.safetensors",
    ),
    ("pytorch_model.bin random bytes", pytorch_bin(bytes(range(256))), "pytorch_model.bin"),
    ("pytorch_model.bin a malicious pickle", pytorch_bin("pickle"), "pytorch_model.bin"),
    ("pytorch_model.bin a list", pytorch_bin([1, 2]), "pytorch_model.bin"),
]


@pytest.mark.parametrize("case, make, name", GPT2_CORRUPT, ids=[c for c, _, _ in GPT2_CORRUPT])
def test_corrupt_gpt2_folder_is_one_error_naming_the_file(valid, tmp_path, case, make, name):
    """A GPT-2 folder (config.json + weights) with a corrupt or inconsistent file is a UserError naming it; its
    config's sizes are checked against its weights before any model is built."""
    folder = tmp_path / "gpt2"
    shutil.copytree(valid["gpt2"], folder)
    make(folder)
    with one_error(name):
        load_base(str(folder))
    assert not os.path.exists(folder / "executed")


# ----------------------------------------------------------------------------------------------
# PEFT folders (export.py import-peft)


def adapter_config(**changes):
    def make(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))

    return make


PEFT_CORRUPT = [
    ("adapter_config.json missing", lambda f: os.remove(f / "adapter_config.json"), "adapter_config.json"),
    ("adapter_config.json empty", lambda f: (f / "adapter_config.json").write_text(""), "adapter_config.json"),
    ("adapter_config.json not JSON", lambda f: (f / "adapter_config.json").write_text("{r: 2"), "adapter_config.json"),
    ("adapter_config.json a list", lambda f: (f / "adapter_config.json").write_text("[]"), "adapter_config.json"),
    (
        "adapter_config.json not UTF-8",
        lambda f: (f / "adapter_config.json").write_bytes(b'{"r": "\xfe"}'),
        "adapter_config.json",
    ),
    ("r a string", adapter_config(r="2"), "adapter_config.json"),
    ("r zero", adapter_config(r=0), "adapter_config.json"),
    ("r huge", adapter_config(r=10**9), "adapter_model.safetensors"),
    ("r not the tensors'", adapter_config(r=3), "adapter_model.safetensors"),
    ("lora_alpha a string", adapter_config(lora_alpha="4"), "adapter_config.json"),
    ("target_modules a number", adapter_config(target_modules=5), "adapter_config.json"),
    ("target_modules numbers", adapter_config(target_modules=[1, 2]), "adapter_config.json"),
    ("target_modules a bad regex", adapter_config(target_modules="(c_attn"), "adapter_config.json"),
    ("weights missing", lambda f: os.remove(f / "adapter_model.safetensors"), "adapter_model.safetensors"),
    ("weights empty", lambda f: (f / "adapter_model.safetensors").write_bytes(b""), "adapter_model.safetensors"),
    (
        "weights truncated",
        lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:200]),
        "adapter_model.safetensors",
    ),
]


@pytest.mark.parametrize("case, make, name", PEFT_CORRUPT, ids=[c for c, _, _ in PEFT_CORRUPT])
def test_corrupt_peft_folder_is_one_error_naming_the_file(valid, tmp_path, case, make, name):
    """export.py import-peft of a corrupt PEFT folder is a UserError naming the file, before any expert is built
    (r is checked against the stored tensors), and writes nothing."""
    folder = tmp_path / "peft"
    shutil.copytree(valid["peft"], folder)
    make(folder)
    out = tmp_path / "x.safetensors"
    with one_error(name):
        export.main(["import-peft", f"--peft={folder}", f"--base={valid['gpt2']}", "--domain=x", f"--out={out}"])
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------
# Config files, a user's text and records, prompt files

CONFIG_CORRUPT = [
    ("empty", b""),
    ("not JSON", b"max_iters: 5"),
    ("a list", b"[5]"),
    ("not UTF-8", b'{"out_dir": "\xff"}'),
    ("a folder", None),
    ("nan", b'{"learning_rate": NaN}'),
    ("infinity", b'{"min_lr": Infinity}'),
    ("a negative size", b'{"batch_size": -1}'),
    ("text that is no int", b'{"max_iters": "five"}'),
]


@pytest.mark.parametrize("case, content", CONFIG_CORRUPT, ids=[c for c, _ in CONFIG_CORRUPT])
def test_corrupt_config_file_is_one_error_naming_it(tmp_path, case, content):
    """A config file that is not a JSON object of valid values is a UserError naming the file."""
    path = tmp_path / "my.json"
    path.mkdir() if content is None else path.write_bytes(content)
    with one_error("my.json"):
        parse_config(TrainConfig, [str(path)])


USER_TEXT_CORRUPT = [
    ("task not UTF-8", "task", b'{"prompt": "caf\xe9", "response": "x"}\n{"prompt": "a", "response": "b"}\n'),
    ("task binary", "task", b'{"prompt": "a", "response": "b"}\n\x00\x01\x02\n'),
    ("task empty", "task", b""),
    ("task blank lines only", "task", b"\n\n  \n"),
    ("task not JSON", "task", b'{"prompt": "a", "response": "b"}\n{prompt: a}\n'),
    ("task a record that is a list", "task", b'{"prompt": "a", "response": "b"}\n["a", "b"]\n'),
    ("task a prompt that is a number", "task", b'{"prompt": 1, "response": "b"}\n{"prompt": "a", "response": "b"}\n'),
    ("task one record", "task", b'{"prompt": "a", "response": "b"}\n'),
    ("task a folder", "task", None),
    ("text binary", "text", bytes(range(256))),
    ("text not UTF-8", "text", "déjà vu, a second time\n".encode("latin-1")),
    ("text empty", "text", b""),
    ("text jsonl without text", "text", b'{"body": "a"}\n'),
]


@pytest.mark.parametrize("case, flag, content", USER_TEXT_CORRUPT, ids=[c for c, _, _ in USER_TEXT_CORRUPT])
def test_bad_user_text_is_one_error_naming_the_file(tmp_path, case, flag, content):
    """prepare.py --task / --text with a file that is not UTF-8 text, is binary, empty or holds bad records is a
    UserError naming the file, and leaves the existing data set as it was."""
    out = tmp_path / "data"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    name = "mine.jsonl" if flag == "task" or "jsonl" in case else "mine.txt"
    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    spec = f"--{flag}=mine={path}" if flag == "task" else f"--text=mine={tmp_path / name}"
    with one_error(name):
        prepare([f"--out_dir={out}", "--only=none", spec])
    assert os.listdir(out) == ["meta.json"] and (out / "meta.json").read_text() == "{}"


def test_prompt_file_not_utf8_is_one_error(tmp_path):
    """sample.py --prompt=FILE:path with a file that is not UTF-8 is a UserError naming it."""
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"caf\xe9")
    with one_error("prompt.txt"):
        sample.read_prompts(f"FILE:{path}")


# ----------------------------------------------------------------------------------------------
# Nothing exhausted: a file claiming huge sizes is refused without allocating them

MEMORY_PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from config import UserError
from files import add_expert_file, load_base, load_bundle
import export

def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

cases = json.loads(sys.argv[1])
base, tokenizer = load_base(cases["base"])
load_base(cases["gpt2"])
start = peak_mb()
for kind, path in cases["files"]:
    try:
        if kind == "expert":
            add_expert_file(load_base(cases["base"])[0], path, tokenizer)
        elif kind == "bundle":
            load_bundle(path, load_base(cases["base"])[0], tokenizer)
        elif kind == "router":
            import train_router
            train_router.main(["--base=" + cases["base"], "--data_dir=" + cases["data"], "--experts=" + path,
                               "--out_dir=" + path + "/moa", "--domains=arith,upper", "--progress=False"])
        elif kind == "peft":
            export.main(["import-peft", "--peft=" + path, "--base=" + cases["gpt2"], "--domain=x",
                         "--out=" + path + "/x.safetensors"])
        else:
            load_base(path)
        print(kind, path, "LOADED")
    except UserError:
        pass
    print(kind, path, round(peak_mb() - start))
"""


def test_huge_sizes_claimed_are_refused_without_allocating(valid, tiny_data, tmp_path):
    """Files whose metadata or config claims sizes far beyond what they hold (an expert of rank 250,000, loaded
    alone or as the first of train_router.py's experts, a bundle of rank 250,000 or of 200,000 domains, a
    checkpoint and a GPT-2 config.json claiming a 1 GB model, a PEFT adapter of r 250,000; each would need
    hundreds of MB or more) are refused, and the loading process's peak memory grows by less than 64 MB."""
    files = []
    for kind, make in [
        ("expert", edit_meta(rank=250_000)),
        ("bundle", edit_meta(rank=250_000)),
        ("bundle", edit_meta(domains=[f"d{i}" for i in range(200_000)])),
    ]:
        files.append((kind, write_corrupt(tmp_path / f"{kind}{len(files)}.safetensors", make, valid[kind], kind)))
    os.makedirs(tmp_path / "experts")
    shutil.copy(files[0][1], tmp_path / "experts" / "arith.safetensors")
    shutil.copy(valid["expert"], tmp_path / "experts" / "upper.safetensors")
    files.append(("router", str(tmp_path / "experts")))
    os.makedirs(tmp_path / "base")
    files.append(
        (
            "checkpoint",
            write_ckpt(tmp_path / "base" / "ckpt.pt", model_config(n_embd=3200, n_head=2), valid["base"], tmp_path)[0],
        )
    )
    shutil.copytree(valid["gpt2"], tmp_path / "gpt2")
    hf_config(n_embd=3200)(tmp_path / "gpt2")
    files.append(("gpt2", str(tmp_path / "gpt2")))
    shutil.copytree(valid["peft"], tmp_path / "peft")
    adapter_config(r=250_000)(tmp_path / "peft")
    files.append(("peft", str(tmp_path / "peft")))
    cases = json.dumps({"base": valid["base"], "gpt2": valid["gpt2"], "data": tiny_data, "files": files})
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE.format(root=REPO_ROOT), cases], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == len(files) and not any("LOADED" in line for line in lines), result.stdout
    for line in lines:
        assert int(line.split()[-1]) < 64, line
