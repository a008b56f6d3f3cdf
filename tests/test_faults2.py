"""Bad input, round two (issue 26): names that would be paths, NaN and inf weights, tensors a loader would drop or
cast, JSON nested too deeply, sizes beyond the machine's memory, a resume that is not the saved run, variables
torchrun would set, and flags that contradict each other. Each ends in one line naming the file, flag or variable,
exit status 1, with nothing written.

Then the suite's blind spots, each pinned by a direct test: the settings a bundle carries, the per-token mixture,
the decision each routing mode reports, the summaries evaluate_tasks reports, the speed paths' runs and merged
weights, and routes left on layers.
"""

import json

import pytest
from test_faults import (
    edit_meta,
    one_error,
    small_data,
    valid_files,
    write_corrupt,
)
from test_outputs import snapshot

import export
import sample
import train_base
import train_lora
import train_router
from config import UserError, parse_config
from conftest import assert_one_line_error, run_script
from files import (
    add_expert_file,
    load_base,
    load_bundle,
)
from trainer import TaskData

RESUME = ["--init_from=resume", "--max_iters=100"]  # tiny_base's own last step: a run that resumes ends at once
TASK_ARGS = ["--batch_size=4", "--eval_iters=1", "--progress=False", "--device=cpu", "--warmup_iters=1"]


@pytest.fixture(scope="module")
def valid(tiny_base, tmp_path_factory):
    """Valid files to change (test_faults.py's): an expert and a bundle on tiny_base, a GPT-2 folder, a PEFT adapter."""
    return valid_files(tiny_base, tmp_path_factory.mktemp("valid"))


def lora_args(data, base, out, *more):
    return [f"--data_dir={data}", f"--base={base}", f"--out_dir={out}", *TASK_ARGS, *more]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ----------------------------------------------------------------------------------------------
# Names that would be paths: a domain, task or corpus source names a folder or file, so it is letters, digits, _
# and - wherever it is read (a bundle, an expert, meta.json, a flag).

BAD_NAMES = ["../outside", "ABSOLUTE", "a/b", "..", ".", "line\nbreak", "tab\there", "naïve", "two words", "a\\b"]


def bad_name(name, tmp_path):
    return str(tmp_path / "outside") if name == "ABSOLUTE" else name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bundle_domain_that_is_a_path_is_refused_and_export_writes_nothing(valid, tmp_path, name):
    """A bundle whose domain names include one that is not letters, digits, _ and - (../, an absolute path, a
    newline...) is refused on loading, naming the file; export.py bundle, which makes a folder per domain, writes
    nothing inside --out or beside it."""
    name = bad_name(name, tmp_path)
    path = write_corrupt(tmp_path / "bad.safetensors", edit_meta(domains=["arith", name]), valid["bundle"], "names")
    gpt, tokenizer = load_base(valid["base"])
    with one_error("bad.safetensors"):
        load_bundle(path, gpt, tokenizer)
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    with one_error("bad.safetensors"):
        export.main(["bundle", f"--bundle={path}", f"--base={valid['base']}", f"--out={tmp_path / 'out' / 'peft'}"])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", BAD_NAMES)
def test_an_expert_domain_that_is_a_path_is_refused(valid, tmp_path, name):
    """An expert file whose domain is not a name of letters, digits, _ and - is refused on loading, naming the file."""
    path = write_corrupt(tmp_path / "bad.safetensors", edit_meta(domain=bad_name(name, tmp_path)), valid["expert"], "")
    gpt, tokenizer = load_base(valid["base"])
    with one_error("bad.safetensors"):
        add_expert_file(gpt, path, tokenizer)


@pytest.mark.parametrize("kind", ["corpus", "tasks"])
@pytest.mark.parametrize("name", ["../c", "ABSOLUTE", "c/../c", "x\ny"])
def test_a_data_set_name_that_is_a_path_is_refused(tmp_path, kind, name):
    """A meta.json naming a corpus source or task that is not a name (each is a folder of the data set) is refused
    naming meta.json, before any file is read through it."""
    folder = tmp_path / "data"
    small_data(folder)
    meta = json.loads((folder / "meta.json").read_text())
    meta[kind] = {bad_name(name, tmp_path): {}}
    (folder / "meta.json").write_text(json.dumps(meta))
    with one_error("meta.json"):
        TaskData(str(folder), "all")


BAD_NAME_FLAGS = [
    (train_lora.LoRAConfig, "--domain=../upper"),
    (train_lora.LoRAConfig, "--domain=/tmp/upper"),
    (train_lora.LoRAConfig, "--domain=up per"),
    (train_lora.LoRAConfig, "--name=../expert"),
    (train_lora.LoRAConfig, "--name=/tmp/expert"),
    (train_lora.LoRAConfig, "--name=.hidden"),
    (train_lora.LoRAConfig, "--name=a/b"),
    (train_lora.LoRAConfig, "--domains=upper,../x"),
    (train_router.RouterConfig, "--name=../moa"),
    (train_router.RouterConfig, "--name=.."),
    (train_router.RouterConfig, "--add_domain=a/b"),
    (train_router.RouterConfig, "--add_domain=count\n"),
    (train_router.RouterConfig, "--remove_domain=.."),
    (train_router.RouterConfig, "--domains=upper arith"),
    (train_base.BaseConfig, "--corpus=../c"),
    (export.ExportConfig, "--domain=../x"),
]


@pytest.mark.parametrize("cls, flag", BAD_NAME_FLAGS, ids=[f"{c.__name__} {f!r}" for c, f in BAD_NAME_FLAGS])
def test_a_flag_naming_a_file_that_is_a_path_is_one_error(cls, flag):
    """A domain, task or output name given as a flag that would be a path (../, /, a space, a newline) is a one-line
    UserError naming the flag, raised while parsing: before anything is read or written."""
    with pytest.raises(UserError, match=f"--{flag[2:].partition('=')[0]}=") as e:
        parse_config(cls, [flag])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "cls, flag",
    [
        (train_lora.LoRAConfig, "--name=all+count"),
        (train_lora.LoRAConfig, "--name=all_r32"),
        (train_lora.LoRAConfig, "--name=v1.2"),
        (train_lora.LoRAConfig, "--domain=my-task_2"),
        (train_router.RouterConfig, "--name=moa+count_allrows"),
        (train_router.RouterConfig, "--domains=upper, arith"),
        (train_router.RouterConfig, "--add_domain=count"),
    ],
)
def test_names_nanomoa_writes_itself_pass(cls, flag):
    """The names the demo and README use (moa+count_allrows, all_r32, a task with - and _) pass the name checks."""
    parse_config(cls, [flag])


def test_a_newline_in_a_value_or_a_path_stays_on_one_line(tiny_base):
    """A bad flag value holding a newline is named on one line (as its repr); and from the command line, an error
    naming a path that holds one prints it as \\n: one line."""
    with pytest.raises(UserError) as e:
        parse_config(sample.SampleConfig, ["--mode=last\nlayer"])
    assert "\n" not in str(e.value) and "--mode='last\\nlayer'" in str(e.value)
    result = run_script("sample.py", f"--base={tiny_base}", "--expert=no\nsuch.safetensors", "--device=cpu")
    assert_one_line_error(result, "no\\nsuch.safetensors")
