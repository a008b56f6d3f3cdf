"""Bad flags (issue 15): every script's numbers and choices are checked where they are parsed (config.py):
nan and inf, sizes, steps and intervals below their least value, rates and probabilities out of range, choices
that do not exist. Each is one line naming the flag, raised before anything is written or deleted; the checks
that need two flags or the base (heads dividing the width, a block beyond the base's context) come next.
"""

import os

import pytest

import bench
import demo
import export
import results
import sample
import train_base
import train_lora
import train_router
from config import UserError, parse_config
from conftest import TINY_BASE_ARGS, assert_one_line_error, run_script
from data.identifiers import IdentifiersConfig
from data.prepare import PrepareConfig

CONFIGS = {
    "train_base": train_base.BaseConfig,
    "train_lora": train_lora.LoRAConfig,
    "train_router": train_router.RouterConfig,
    "sample": sample.SampleConfig,
    "results": results.ResultsConfig,
    "demo": demo.DemoConfig,
    "bench": bench.BenchConfig,
    "prepare": PrepareConfig,
    "export": export.ExportConfig,
    "identifiers": IdentifiersConfig,
}

TRAINING = [
    "--batch_size=0",
    "--batch_size=-4",
    "--grad_accum=-1",
    "--max_iters=-1",
    "--lr_decay_iters=-1",
    "--learning_rate=0",
    "--learning_rate=-1e-3",
    "--learning_rate=nan",
    "--learning_rate=inf",
    "--min_lr=-1",
    "--min_lr=nan",
    "--warmup_iters=-5",
    "--weight_decay=-0.1",
    "--weight_decay=inf",
    "--beta1=1",
    "--beta1=-0.1",
    "--beta2=1.5",
    "--beta2=nan",
    "--grad_clip=-1",
    "--grad_clip=inf",
    "--eval_interval=0",
    "--eval_iters=0",
    "--log_interval=0",
    "--seed=18446744073709551616",
]
BAD_FLAGS = [
    ("train_base", flag)
    for flag in TRAINING
    + ["--block_size=0", "--n_layer=0", "--n_head=0", "--n_embd=-1", "--dropout=1", "--dropout=-0.5", "--dropout=nan"]
]
BAD_FLAGS += [
    ("train_lora", flag)
    for flag in TRAINING[::3]
    + [
        "--block_size=-1",
        "--init_from=gpt2",
        "--rank=0",
        "--rank=-8",
        "--alpha=nan",
        "--alpha=-inf",
        "--lora_dropout=1.5",
    ]
]
BAD_FLAGS += [
    ("train_router", flag)
    for flag in TRAINING[1::3]
    + [
        "--block_size=-64",
        "--init_from=latest",
        "--eta=-1",
        "--eta=nan",
        "--top_k=0",
        "--mode=oracle",
        "--mode=",
        "--pooling=max",
        "--expert_init=zeros",
        "--rank=0",
        "--alpha=inf",
        "--lora_dropout=-0.1",
        "--router_lr=0",
        "--router_lr=inf",
        "--router_hidden=-1",
        "--router_hidden=2.5",
    ]
]
BAD_FLAGS += [
    ("sample", flag)
    for flag in [
        "--num_samples=0",
        "--max_new_tokens=-5",
        "--template=chatml",
        "--temperature=-1",
        "--temperature=nan",
        "--top_k=-1",
        "--top_p=1.5",
        "--top_p=-0.1",
        "--top_p=nan",
        "--mode=random",
        "--seed=-9223372036854775809",
        "--trace=-1",
    ]
]
BAD_FLAGS += [("results", flag) for flag in ["--records=0", "--batch_size=0", "--mode=label", "--mode=token"]]
BAD_FLAGS += [
    ("demo", flag)
    for flag in ["--seeds=-1", "--base_iters=0", "--cap=-1", "--pair_steps=0", "--stop_flat=1", "--jobs=-1"]
]
BAD_FLAGS += [("bench", flag) for flag in ["--repeats=0", "--threads=-1"]]
BAD_FLAGS += [
    ("prepare", flag) for flag in ["--max_tokens=0", "--records=-1", "--val_records=0", "--seed=1180591620717411303424"]
]
BAD_FLAGS += [
    ("export", "--force=2"),
    ("identifiers", "--records=0"),
    ("demo", "--block_size=-1"),
]  # make.py's flags: tests/test_assignments.py (not in the student copy)


@pytest.mark.parametrize("script, flag", BAD_FLAGS, ids=[f"{s} {f}" for s, f in BAD_FLAGS])
def test_bad_flag_is_one_error_naming_it(script, flag):
    """A value out of its field's range (or not finite, or not a choice) is a one-line UserError naming the flag."""
    with pytest.raises(UserError, match=f"--{flag[2:].partition('=')[0]}=") as e:
        parse_config(CONFIGS[script], [flag])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("script", CONFIGS)
def test_defaults_pass_and_every_bound_names_a_field(script):
    """Each script's defaults pass its checks, and each bound it declares (CHECKS) is for one of its fields."""
    cls = CONFIGS[script]
    parse_config(cls, [])
    fields = set(cls.__dataclass_fields__)
    for klass in cls.__mro__:
        assert set(vars(klass).get("CHECKS", {})) <= fields, klass


def test_bound_values_themselves_pass():
    """The bounds are where the ranges say: the least size 1, a zero rate where allowed, top_p 0 and 1."""
    cfg = parse_config(
        train_base.BaseConfig,
        [
            "--batch_size=1",
            "--warmup_iters=0",
            "--weight_decay=0",
            "--grad_clip=0",
            "--beta1=0",
            "--dropout=0",
            "--max_iters=0",
        ],
    )
    assert (cfg.batch_size, cfg.grad_clip, cfg.max_iters) == (1, 0.0, 0)
    assert parse_config(sample.SampleConfig, ["--top_p=0", "--temperature=0", "--top_k=0"]).top_p == 0.0
    assert parse_config(sample.SampleConfig, ["--top_p=1"]).top_p == 1.0
    assert parse_config(train_lora.LoRAConfig, ["--block_size=0"]).block_size == 0  # 0: the base's context


def test_bad_value_in_a_config_file_names_the_file(tmp_path):
    """A bound broken by a config file's value names the key and the file."""
    path = tmp_path / "run.json"
    path.write_text('{"eval_interval": 0}')
    with pytest.raises(UserError, match=f"eval_interval=0 in {path}: must be >= 1"):
        parse_config(train_base.BaseConfig, [str(path)])


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


@pytest.mark.parametrize(
    "script, flag",
    [
        ("train_base.py", "--learning_rate=nan"),
        ("train_base.py", "--grad_accum=-2"),
        ("data/prepare.py", "--records=0"),
        ("sample.py", "--top_p=2"),
    ],
)
def test_bad_flag_from_the_command_line_changes_nothing(tiny_base, script, flag, tmp_path):
    """From the command line, a bad flag exits 1 with one line naming it, and an existing output folder (a run's
    checkpoint and log, a data set) is left byte-identical."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 0}\n')
    (out / "meta.json").write_text("{}")
    before = snapshot(out)
    assert_one_line_error(
        run_script(script, flag, f"--out_dir={out}" if script != "sample.py" else f"--base={tiny_base}"),
        flag.partition("=")[0],
    )
    assert snapshot(out) == before


def test_heads_must_divide_the_width(tiny_data, tmp_path):
    """train_base.py from scratch with n_embd not a multiple of n_head is a UserError naming both, before the
    out_dir is created."""
    with pytest.raises(UserError, match="--n_embd=30 must be a multiple of --n_head=4"):
        train_base.main(
            TINY_BASE_ARGS + [f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", "--n_embd=30", "--n_head=4"]
        )
    assert not os.path.exists(tmp_path / "out")


def test_block_beyond_the_base_context(tiny_data, tiny_base, tmp_path):
    """train_lora.py with --block_size beyond the base's context (64) is a UserError, before anything is written."""
    with pytest.raises(UserError, match="--block_size=65 is beyond the base's context of 64"):
        train_lora.main(
            [
                f"--data_dir={tiny_data}",
                f"--base={tiny_base}",
                f"--out_dir={tmp_path / 'out'}",
                "--domain=arith",
                "--block_size=65",
            ]
        )
    assert not os.path.exists(tmp_path / "out")


def test_top_k_beyond_the_experts(tiny_data, tiny_base, tmp_path):
    """train_router.py --mode=token with --top_k larger than the number of experts is a UserError, before anything
    is written."""
    with pytest.raises(UserError, match="--top_k=3: more than the 2 experts"):
        train_router.main(
            [
                f"--data_dir={tiny_data}",
                f"--base={tiny_base}",
                f"--out_dir={tmp_path / 'out'}",
                "--domains=arith,upper",
                "--mode=token",
                "--top_k=3",
                "--expert_init=random",
            ]
        )
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("script", sorted(CONFIGS))
def test_help_lists_every_flag_with_its_type_default_and_comment(script):
    """config.help_text (what --help prints) has one line per field of the script's config dataclass: the flag with
    its default, its type, and the comment written beside the field (none is left without one)."""
    from dataclasses import fields

    from config import help_text

    cls = CONFIGS[script]
    lines = {line.split("=", 1)[0].strip(): line for line in help_text(cls).splitlines() if line.startswith("  --")}
    assert list(lines) == [f"--{f.name}" for f in fields(cls)]
    for f in fields(cls):
        flag, kind, *comment = lines[f"--{f.name}"].split()
        assert flag == f"--{f.name}={getattr(cls(), f.name)}" and kind == f.type.__name__, lines[f"--{f.name}"]
        assert comment, f"--{f.name} has no comment in {cls.__name__}"


@pytest.mark.parametrize(
    "script",
    [
        "train_lora.py",
        "sample.py",
        "data/prepare.py",
        "export.py",
        "data/identifiers.py",
        "scripts/calibration.py",
        "scripts/probe_routers.py",
        "scripts/phrasings.py",
    ],
)
def test_every_script_answers_help(script):
    """`python SCRIPT --help` prints the script's first docstring line and its flags, exits 0, and writes nothing."""
    result = run_script(script, "--help")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "Flags (--key=value" in result.stdout and "\n  --" in result.stdout
