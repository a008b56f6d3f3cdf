"""Your own tasks, first class: prepare.py's splits of a user's records (calib, and unseen from --phrasings), the
length report and the context that fits, and the whole study (demo.py, results.py) on a small user data set made
by data/identifiers.py."""

import json
import os
import subprocess
import sys
import time

import pytest

import config
import demo
import sample
import train_base
from batches import TaskData
from config import UserError
from conftest import TINY_BASE_ARGS
from data import identifiers
from data.prepare import fitting_context
from data.prepare import main as prepare
from files import read_meta
from tokenizer import get_tokenizer

PHRASINGS = ["Say the number.", "Number, please.", "which number is it", "Read the number out."]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def alpaca(n):
    return [{"instruction": "Spell it" if i % 2 else "Name it", "input": f"n{i}", "output": f"#{i}"} for i in range(n)]


def texts(data, name, split):
    enc = get_tokenizer(data.tokenizer)
    records = [data.record(name, split, i) for i in range(data.count(name, split))]
    return [(enc.decode(p), enc.decode(r[:-1])) for p, r in records]  # each response ends with EOT


def test_a_users_records_give_calib_and_with_phrasings_unseen(tmp_path):
    """From 20 records on, a tenth of a user's records is held out as calib; with --phrasings, calib's records are
    asked in the odd lines' phrasings and unseen holds val's records in the even lines'; no training or validation
    prompt uses a phrasing, and the records keep their inputs and outputs."""
    path = write_jsonl(tmp_path / "num.jsonl", alpaca(30))
    (tmp_path / "num.txt").write_text("\n".join(PHRASINGS) + "\n\n")
    data_dir = tmp_path / "data"
    prepare([f"--out_dir={data_dir}", "--only=none", f"--task=num={path}", f"--phrasings=num={tmp_path / 'num.txt'}"])
    data = TaskData(str(data_dir), "num")
    counts = {split: data.count("num", split) for split in ("train", "val", "calib", "unseen")}
    assert counts == {"train": 24, "val": 3, "calib": 3, "unseen": 3}
    given = {f"n{i}": f"#{i}" for i in range(30)}

    def asked(split):
        """(instruction, input, output) of each record of a split."""
        out = []
        for prompt, response in texts(data, "num", split):
            instruction, given_input = prompt.split("\n\n### Input:\n")
            out.append((instruction.removeprefix("### Instruction:\n"), given_input.split("\n")[0], response))
        return out

    for split in ("train", "val"):
        assert {i for i, _, _ in asked(split)} <= {"Spell it", "Name it"}
    assert [i for i, _, _ in asked("calib")] == [PHRASINGS[0], PHRASINGS[2], PHRASINGS[0]]
    assert [i for i, _, _ in asked("unseen")] == [PHRASINGS[1], PHRASINGS[3], PHRASINGS[1]]
    assert [x[1:] for x in asked("unseen")] == [x[1:] for x in asked("val")]  # val's records, rephrased
    for split in counts:
        assert all(given[x] == y for _, x, y in asked(split))
    seen = {split: {x for _, x, _ in asked(split)} for split in ("train", "val", "calib")}
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["calib"] and not seen["val"] & seen["calib"]


def test_fewer_than_20_records_keep_no_calib(tmp_path):
    path = write_jsonl(tmp_path / "num.jsonl", alpaca(19))
    prepare([f"--out_dir={tmp_path / 'data'}", "--only=none", f"--task=num={path}"])
    data = TaskData(str(tmp_path / "data"), "num")
    assert (data.count("num", "train"), data.count("num", "val"), data.count("num", "calib")) == (18, 1, 0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("prompt records", 'holds "prompt" records; phrasings replace the "instruction"'),
        ("used", "'Name it' is an instruction of"),
        ("no task", "--phrasings=other=...: no --task=other"),
        ("one line", "1 instruction\\(s\\); at least 2"),
    ],
)
def test_bad_phrasings_are_one_error_and_write_nothing(tmp_path, case, message):
    records = [{"prompt": f"p{i}\n", "response": "r"} for i in range(30)] if case == "prompt records" else alpaca(30)
    path = write_jsonl(tmp_path / "num.jsonl", records)
    lines = {"used": ["Name it", "Say it"], "one line": ["Say it"]}.get(case, PHRASINGS)
    (tmp_path / "p.txt").write_text("\n".join(lines))
    name = "other" if case == "no task" else "num"
    with pytest.raises(UserError, match=message):
        prepare(
            [
                f"--out_dir={tmp_path / 'data'}",
                "--only=none",
                f"--task=num={path}",
                f"--phrasings={name}={tmp_path / 'p.txt'}",
            ]
        )
    assert not os.path.exists(tmp_path / "data")


def test_the_example_data_set_never_replaces_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        identifiers.main([f"--out_dir={tmp_path}", "--records=5"])
    assert os.listdir(tmp_path) == ["notes.txt"]
    identifiers.main([f"--out_dir={tmp_path / 'ids'}", "--records=5"])
    identifiers.main([f"--out_dir={tmp_path / 'ids'}", "--records=5"])  # its own folder: rewritten
    assert sorted(os.listdir(tmp_path / "ids")) == sorted(
        f"{t}.{e}" for t in identifiers.TASKS for e in ("jsonl", "txt")
    )


@pytest.mark.parametrize("longest, context", [(2, 128), (129, 128), (130, 192), (193, 192), (194, 256)])
def test_the_context_that_fits_a_record(longest, context):
    """A record of n tokens (its EOT included) fills n - 1 positions: 128 fits 129 tokens, then multiples of 64."""
    assert fitting_context(longest) == context


def test_prepare_reports_every_tasks_lengths_and_the_context_that_fits(tmp_path, capsys):
    records = [{"prompt": "Q: say it\n", "response": "z" * (100 + 2 * i)} for i in range(30)]  # 111 to 169 tokens
    prepare([f"--out_dir={tmp_path / 'data'}", "--only=none", f"--task=t={write_jsonl(tmp_path / 't.jsonl', records)}"])
    out, err = capsys.readouterr()
    lengths = [10 + 100 + 2 * i for i in range(30)]  # positions filled: prompt + response (+ EOT - 1)
    cut = sum(n > 128 for n in lengths)
    assert f"longest {max(lengths)} tokens" in out and f"{cut} longer than 128" in out, out
    assert "95th percentile" in out
    assert f"train_base.py --block_size={fitting_context(max(lengths) + 1)} fits them all" in err, err
    meta = TaskData(str(tmp_path / "data"), "t").meta
    assert demo.base_context(meta) == 192 == fitting_context(max(lengths) + 1)


def test_a_missing_data_set_of_your_own_is_one_error(tmp_path):
    """demo.py prepares the default data set when it is missing, but never makes it in another folder (a typo
    would train the built-in tasks where your own were meant)."""
    with pytest.raises(UserError, match="no data set there.*data/prepare.py"):
        demo.main([f"--data_dir={tmp_path / 'mine'}", f"--out={tmp_path / 'out'}", "--device=cpu"])
    assert not os.path.exists(tmp_path / "mine") and not os.path.exists(tmp_path / "out")


def test_busy_cores_counts_a_process_that_spins():
    """cpu_threads() counts the cores other processes keep busy now (not the load average, which lags)."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert config.busy_cores(0.5) >= 0.7
    finally:
        spin.kill()
        spin.wait()


def test_the_study_on_your_own_tasks(tmp_path, capsys):
    """demo.py on a user's data set (data/identifiers.py's tasks, 40 records each, phrasings given, words held
    back), on a tiny base with the context the records need: every step runs, the routers are calibrated on the
    user's calib split, and results.py's tables name the user's tasks, with routing and confidence on the unseen
    phrasings, and the adding-a-task table for the held-back one; the examples show the user's phrasings."""
    ids, data_dir, out = tmp_path / "ids", tmp_path / "data", tmp_path / "out"
    identifiers.main([f"--out_dir={ids}", "--records=40"])
    given = [
        f"--{flag}={t}={ids}/{t}.{ext}"
        for t in identifiers.TASKS
        for flag, ext in (("task", "jsonl"), ("phrasings", "txt"))
    ]
    prepare([f"--out_dir={data_dir}", "--only=python", "--max_tokens=20000", "--held_back=words", *given])
    meta = TaskData(str(data_dir)).meta
    context = demo.base_context(meta)
    assert context == 192  # the Alpaca template and a long name outgrow 128 bytes
    tiny = [a for a in TINY_BASE_ARGS if not a.startswith("--block_size")]
    train_base.main(
        tiny
        + [
            f"--block_size={context}",
            "--max_iters=10",
            "--eval_interval=10",
            f"--data_dir={data_dir}",
            f"--out_dir={out / 'base'}",
        ]
    )
    capsys.readouterr()
    demo.main([f"--data_dir={data_dir}", f"--out={out}", "--cap=4", "--budgets=2", "--add_iters=2", "--device=cpu"])
    printed = capsys.readouterr().out
    tasks = [t for t in identifiers.TASKS if t != "words"]
    bundle = read_meta(str(out / "runs" / "seed1" / "moa" / "moa.safetensors"), "bundle")[1]
    assert bundle["domains"] == tasks and 0 <= bundle["calib_route_acc"] <= 1
    text = (out / "results" / "results.md").read_text()
    assert "| variant | camel | snake | initials | mean |" in text
    moa_row = next(line for line in text.splitlines() if line.startswith("| MoA (joint) |") and "/" in line)
    cells = [c.strip() for c in moa_row.split("|")[2:-1]]  # validation, unseen, hand-written, confidences
    assert cells[0].endswith("%") and cells[1].endswith("%") and cells[2] == "-", moa_row
    assert "/" in cells[3] and "/" in cells[4] and cells[5] == "-", moa_row
    assert "Adding the task words" in text
    written = json.loads((out / "results" / "results.json").read_text())
    assert "MoA + words (new router row only)" in written["adaptation"][0]
    assert sum(line.startswith("*") for line in printed.splitlines()) == 2 * len(tasks)  # 2 unseen-phrasing prompts
    unseen = identifiers.PHRASINGS["camel"][1][1::2]  # the even lines of camel.txt
    assert any(p in line for line in printed.splitlines() if line.startswith("*") for p in unseen), printed
    assert os.path.isfile(out / "results" / "routing.png")
    # sample.py in the records' template: instruction, then the input after the first newline; by default it
    # generates what the context leaves after the prompts
    bundle_path = out / "runs" / "seed1" / "moa" / "moa.safetensors"
    got = sample.main(
        [f"--base={out / 'base'}", f"--bundle={bundle_path}", "--template=alpaca", "--temperature=0", "--device=cpu"]
        + ["--prompt=Convert to CamelCase\\nread_text||initials please"]
    )
    printed = capsys.readouterr().out
    assert "### Instruction:\nConvert to CamelCase\n\n### Input:\nread_text\n\n### Response:\n" in printed
    assert "### Instruction:\ninitials please\n\n### Response:\n" in printed
    assert printed.count("-> expert") == 2 and got.size(1) <= context
