"""Outputs and file-system faults (issue 15): no output ever replaces an input; two runs on one out_dir: the
second refuses, and the first's log is untouched; what a killed run leaves (its lock, half-written temporary
files, log lines beyond its checkpoint) is cleared or taken over by the next run; a read-only folder, a full disk
or a file where a folder should be ends in one line naming the path, and a failed data/prepare.py leaves the old
data set whole.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

import export
import train_base
import train_lora
import train_router
from batches import CorpusData
from config import UserError
from conftest import REPO_ROOT, TINY_BASE_ARGS, assert_one_line_error, run_script
from data.prepare import main as prepare
from files import fingerprint, load_base, save_bundle, save_expert
from moa import MoA, add_experts
from model import GPT, GPTConfig
from storage import atomic_write
from trainer import TrainConfig, train

SMALL_DATA = ["--only=arith", "--records=50", "--val_records=5"]


def snapshot(folder):
    """{relative path: bytes} of every file under folder (a folder's own entry as None)."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


def dead_pid():
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@contextmanager
def live_process():
    """A process that runs while the block does -> its id."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def disk_full(tmp):
    raise OSError("disk full")


def read_steps(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def experts(tiny_base, tmp_path_factory):
    """A folder of two expert files on tiny_base (arith, upper) and a bundle over both beside it."""
    folder = tmp_path_factory.mktemp("files") / "experts"
    gpt, tokenizer = load_base(tiny_base)
    base = fingerprint(gpt)
    for domain in ("arith", "upper"):
        save_expert(
            str(folder / f"{domain}.safetensors"),
            add_experts(load_base(tiny_base)[0], 1, rank=2),
            0,
            domain,
            tokenizer,
            base,
        )
    save_bundle(str(folder.parent / "moa.safetensors"), MoA(gpt, ["arith", "upper"], rank=2), tokenizer, base)
    return folder


# ----------------------------------------------------------------------------------------------
# No output replaces an input


@pytest.mark.parametrize("how", ["same path", "through a link", "through .."])
def test_train_lora_never_overwrites_its_init_expert(experts, tiny_data, tiny_base, tmp_path, how):
    """train_lora.py --init_expert=X whose output (out_dir/<name>.safetensors) is X, however the path is written
    (a symbolic link, ".."), is a UserError before anything is written; X stays byte-identical."""
    folder = tmp_path / "experts"
    shutil.copytree(experts, folder)
    (folder / "sub").mkdir()
    os.symlink(folder, tmp_path / "link")
    out = {"same path": folder, "through a link": tmp_path / "link", "through ..": folder / "sub" / ".."}[how]
    before = snapshot(folder)
    with pytest.raises(UserError, match="would overwrite the input"):
        train_lora.main(
            [
                f"--data_dir={tiny_data}",
                f"--base={tiny_base}",
                f"--out_dir={out}",
                "--domain=arith",
                f"--init_expert={folder / 'arith.safetensors'}",
                "--max_iters=1",
                "--progress=False",
            ]
        )
    assert snapshot(folder) == before


def test_train_lora_never_writes_its_run_over_the_base(tiny_data, tiny_base, tmp_path):
    """An expert run whose checkpoint would land on the base's (out_dir/<name>/ckpt.pt) is refused; the base stays."""
    shutil.copy(tiny_base, tmp_path / "ckpt.pt")
    (tmp_path / "log.jsonl").write_text('{"step": 0}\n')
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="would overwrite the input"):
        train_lora.main(
            [
                f"--data_dir={tiny_data}",
                f"--base={tmp_path}",
                f"--out_dir={tmp_path.parent}",
                f"--name={tmp_path.name}",
                "--domain=arith",
                "--max_iters=1",
                "--progress=False",
            ]
        )
    assert snapshot(tmp_path) == before


def test_train_router_never_overwrites_an_expert_or_its_bundle(experts, tiny_data, tiny_base, tmp_path):
    """train_router.py refuses a bundle named like one of the experts in the experts folder, and a new bundle that
    is its --bundle reached through a link; nothing changes."""
    folder = tmp_path / "experts"
    shutil.copytree(experts, folder)
    shutil.copy(experts.parent / "moa.safetensors", tmp_path / "moa.safetensors")
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-link")
    before = snapshot(tmp_path)
    common = [f"--data_dir={tiny_data}", f"--base={tiny_base}", f"--experts={folder}", "--progress=False"]
    with pytest.raises(UserError, match="would overwrite the input"):
        train_router.main(common + [f"--out_dir={folder}", "--name=arith", "--domains=arith,upper"])
    with pytest.raises(UserError, match="would overwrite the input"):
        train_router.main(
            common
            + [
                f"--out_dir={tmp_path}",
                "--name=moa",
                "--remove_domain=upper",
                f"--bundle={tmp_path.parent / (tmp_path.name + '-link')}/moa.safetensors",
            ]
        )
    assert snapshot(tmp_path) == before


def test_export_never_replaces_a_folder_holding_its_input(experts, tiny_base, tmp_path):
    """export.py with --out a folder that holds its input (an expert, the base, a PEFT adapter), --force or not, is
    a UserError; the input stays."""
    out = tmp_path / "peft"
    out.mkdir()
    shutil.copy(experts / "arith.safetensors", out / "arith.safetensors")
    (out / "adapter_config.json").write_text("{}")  # looks like an earlier export, so --force alone would replace it
    shutil.copy(tiny_base, out / "ckpt.pt")
    before = snapshot(tmp_path)
    for args in (
        ["peft", f"--expert={out / 'arith.safetensors'}", f"--base={tiny_base}", f"--out={out}", "--force"],
        ["hf", f"--base={out / 'ckpt.pt'}", f"--out={out}", "--force"],
        [
            "import-peft",
            f"--peft={out}",
            f"--base={tiny_base}",
            "--domain=x",
            f"--out={out / 'adapter_config.json'}",
            "--force",
        ],
    ):
        with pytest.raises(UserError, match="would overwrite the input"):
            export.main(args)
    assert snapshot(tmp_path) == before


def test_prepare_never_replaces_a_folder_holding_its_input_or_not_its_own(tmp_path):
    """data/prepare.py replaces its --out_dir whole: one holding a --task file, or one with files but no
    meta.json (not a data set), is a UserError and stays as it was."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    (data / "mine.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="would overwrite the input"):
        prepare([f"--out_dir={data}", "--only=none", f"--task=mine={data / 'mine.jsonl'}"])
    with pytest.raises(UserError, match="not a data set written by prepare.py"):
        prepare([f"--out_dir={notes}"] + SMALL_DATA)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# One run per out_dir; a killed run's lock, temporary files and log lines


def base_run(tiny_data, out, *args):
    return train_base.main(TINY_BASE_ARGS + [f"--data_dir={tiny_data}", f"--out_dir={out}", *args])


def test_a_locked_out_dir_is_refused_and_left_as_it_was(tiny_data, tmp_path):
    """While a live process holds out_dir/lock, another run there (even a fresh one, which would start a new log)
    is a UserError naming that process, and changes nothing; a lock whose process is gone is taken over, and
    released when the run ends."""
    out = tmp_path / "run"
    base_run(tiny_data, out, "--max_iters=4", "--eval_interval=2")
    assert not os.path.exists(out / "lock")
    with live_process() as pid:
        (out / "lock").write_text(str(pid))
        before = snapshot(out)
        with pytest.raises(UserError, match=f"in use by process {pid}"):
            base_run(tiny_data, out, "--max_iters=4", "--eval_interval=2")
        assert snapshot(out) == before
    (out / "lock").write_text(str(dead_pid()))
    base_run(tiny_data, out, "--max_iters=4", "--eval_interval=2")
    assert not os.path.exists(out / "lock") and read_steps(out) == [0, 2, 4]


def test_the_lock_is_released_when_training_fails(tiny_data, tmp_path):
    """A run that stops with an error releases its lock: the next run on the same out_dir goes ahead."""
    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"),
        data_dir=tiny_data,
        block_size=16,
        batch_size=2,
        max_iters=2,
        eval_interval=1,
        progress=False,
        device="cpu",
    )

    def failing(model):
        raise UserError("evaluation failed")

    model = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=1, n_embd=8))
    data = CorpusData(tiny_data, "prose", 16)
    with pytest.raises(UserError, match="evaluation failed"):
        train(cfg, model, data, failing)
    assert not os.path.exists(tmp_path / "run" / "lock")
    assert len(train(cfg, model, data, lambda m: {"x": 1.0})) == 2


def test_second_run_refused_while_the_first_runs_then_resume_after_sigkill(tiny_data, tmp_path):
    """A second train_base.py on the out_dir of one that is running exits 1 with one line naming its process, and
    the first one's log is not truncated (it only grows). After the first is killed (SIGKILL), --init_from=resume
    takes over its lock and goes on from its checkpoint, and the log holds every step once."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "train_base.py",
            *TINY_BASE_ARGS,
            f"--data_dir={tiny_data}",
            f"--out_dir={out}",
            "--max_iters=1000000",
            "--eval_interval=5",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (os.path.exists(out / "ckpt.pt") and len(read_steps(out)) >= 2) and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None and os.path.exists(out / "lock"), "the first run did not start"
        log = (out / "log.jsonl").read_text()
        second = run_script(
            "train_base.py", *TINY_BASE_ARGS, f"--data_dir={tiny_data}", f"--out_dir={out}", "--max_iters=10"
        )
        assert_one_line_error(second, f"in use by process {first.pid}")
        assert (out / "log.jsonl").read_text().startswith(log)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = json.loads(torch.load(out / "ckpt.pt", weights_only=True)["meta"])["step"]
    base_run(tiny_data, out, "--init_from=resume", f"--max_iters={step + 5}", "--eval_interval=5")
    steps = read_steps(out)
    assert steps == list(range(0, step + 6, 5)) and not os.path.exists(out / "lock")


def test_resumed_log_has_no_duplicated_steps(tiny_data, tmp_path):
    """A run killed after logging step 15 but before its checkpoint (at step 10 still), with a half-written last
    line, resumes with a log of steps 0, 5, 10, 15, 20: the lines beyond the checkpoint are dropped first."""
    out = tmp_path / "run"
    base_run(tiny_data, out, "--max_iters=10", "--eval_interval=5")
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 15, "train_loss": 1.0}) + '\n{"step": 2')
    base_run(tiny_data, out, "--init_from=resume", "--max_iters=20", "--eval_interval=5")
    assert read_steps(out) == [0, 5, 10, 15, 20]


def test_leftovers_of_killed_writes_are_cleared_on_the_next_start(tiny_data, tmp_path):
    """Temporary files a killed process left (<file>.tmp<pid>, a data set's <folder>.tmp<pid>) are removed by
    the next run, and one whose process still runs is kept; a killed folder swap's <folder>.old<pid> is put back
    when the folder is missing."""
    out, gone = tmp_path / "run", dead_pid()
    out.mkdir()
    (out / f"ckpt.pt.tmp{gone}").write_bytes(b"half a checkpoint")
    (out / f"log.jsonl.old{gone}").write_text("old")
    with live_process() as pid:
        (out / f"ckpt.pt.tmp{pid}").write_bytes(b"being written")
        base_run(tiny_data, out, "--max_iters=1", "--eval_interval=1")
        assert sorted(os.listdir(out)) == ["ckpt.pt", f"ckpt.pt.tmp{pid}", "log.jsonl"]
    data = tmp_path / "data"
    os.makedirs(tmp_path / f"data.old{gone}")
    (tmp_path / f"data.old{gone}" / "meta.json").write_text("{}")
    os.makedirs(tmp_path / f"data.tmp{gone}")
    atomic_write(str(tmp_path / "other"), lambda tmp: open(tmp, "w").close())  # another file: leaves them alone
    assert os.path.isdir(tmp_path / f"data.tmp{gone}")
    with pytest.raises(UserError, match="disk full"):  # a write that fails still puts the old folder back first
        atomic_write(str(data), disk_full, folder=True)
    assert sorted(os.listdir(tmp_path)) == ["data", "other", "run"] and (data / "meta.json").read_text() == "{}"
    prepare([f"--out_dir={data}"] + SMALL_DATA)
    assert (
        sorted(os.listdir(tmp_path)) == ["data", "other", "run"]
        and "arith" in json.loads((data / "meta.json").read_text())["tasks"]
    )


# ----------------------------------------------------------------------------------------------
# File-system faults: a full disk, a read-only folder, a file in the way


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 192 kB tmpfs (a small disk that fills up), or skip where mounting is not allowed."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(folder)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_keeps_the_old_data_set(small_disk):
    """data/prepare.py on a disk that fills up ends in one error naming the data folder; the old data set is
    byte-identical and no temporary folder is left."""
    data = small_disk / "data"
    prepare([f"--out_dir={data}", "--only=arith", "--records=200", "--val_records=20"])
    before = snapshot(small_disk)
    with pytest.raises(UserError, match=f"cannot write {data}") as e:
        prepare([f"--out_dir={data}", "--only=arith,upper,reverse", "--records=3000", "--val_records=20"])
    assert "\n" not in str(e.value) and snapshot(small_disk) == before


def test_full_disk_checkpoint_is_one_line(small_disk, tiny_data):
    """train_base.py whose checkpoint does not fit on the disk exits 1 with one line naming ckpt.pt; no temporary
    file and no lock are left."""
    out = small_disk / "run"
    result = run_script(
        "train_base.py", *TINY_BASE_ARGS, f"--data_dir={tiny_data}", f"--out_dir={out}", "--n_embd=64", "--max_iters=1"
    )
    assert_one_line_error(result, f"cannot write {out / 'ckpt.pt'}")
    assert sorted(os.listdir(out)) == ["log.jsonl"]


def test_read_only_folder_is_one_line(small_disk, tiny_data, tiny_base):
    """A read-only folder as the output of train_base.py, export.py or data/prepare.py: exit 1, one line naming
    the path."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for script, args in [
        ("train_base.py", TINY_BASE_ARGS + [f"--data_dir={tiny_data}"]),
        ("export.py", ["hf", f"--base={tiny_base}"]),
        ("data/prepare.py", SMALL_DATA),
    ]:
        flag = "--out" if script == "export.py" else "--out_dir"
        result = run_script(script, *args, f"{flag}={small_disk / 'out'}")
        assert_one_line_error(result, str(small_disk / "out"), "Read-only file system")


@pytest.mark.parametrize("where", ["out_dir a file", "out_dir under a file"])
def test_a_file_in_the_way_is_one_line(tiny_data, tmp_path, where):
    """train_base.py whose --out_dir is a file, or lies under one, exits 1 with one line naming the path."""
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" if where == "out_dir a file" else tmp_path / "file" / "run"
    result = run_script("train_base.py", *TINY_BASE_ARGS, f"--data_dir={tiny_data}", f"--out_dir={out}")
    assert_one_line_error(result, str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"


def test_a_folder_where_the_expert_goes_is_one_line(tiny_data, tiny_base, tmp_path):
    """train_lora.py whose expert file's path is a folder stops with a UserError naming it; the folder stays."""
    (tmp_path / "arith.safetensors").mkdir()
    (tmp_path / "arith.safetensors" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'arith.safetensors'}"):
        train_lora.main(
            [
                f"--data_dir={tiny_data}",
                f"--base={tiny_base}",
                f"--out_dir={tmp_path}",
                "--domain=arith",
                "--max_iters=1",
                "--batch_size=2",
                "--eval_iters=1",
                "--progress=False",
            ]
        )
    assert (tmp_path / "arith.safetensors" / "keep.txt").read_text() == "mine"
