"""What a first GPU user runs, checked without a GPU: every model variant built on another device (meta),
device and dtype errors, the random draws of a run independent of the processes that compute it, the loss
scale across a resume, and the scripts under torchrun with their defaults (2 processes, gloo, on the CPU),
ending without a deadlock.

The tests marked `cuda` run only where torch sees a CUDA GPU (`bash scripts/gpu_check.sh` runs the suite there).
"""

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from itertools import chain

import pytest
import torch

import fast
import train_base
import train_lora
import train_router
from config import UserError
from conftest import REPO_ROOT, TINY_BASE_ARGS, assert_one_line_error, randomize_B, run_script, torchrun
from moa import MODES, MoA, add_experts, set_route
from model import GPT, GPTConfig
from storage import read_safetensors
from trainer import micro_seed, pick_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIG = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=8)
VARIANTS = ("GPT", "GPT + one expert", "MoA", "MoA + a domain", "MoA + a domain - another", "MoA, router features")


def build(variant, device):
    """One model variant on a GPT made on `device` (only the GPT: everything else must follow it there)."""
    with torch.device(device):
        torch.manual_seed(0)
        gpt = GPT(CONFIG)
    if variant == "GPT":
        return gpt
    if variant == "GPT + one expert":
        set_route(add_experts(gpt, 1, rank=2), 0)
        return gpt
    moa = MoA(gpt, ["a", "b"], rank=2, router_hidden=4 if variant == "MoA, router features" else 0)
    if variant != "MoA":
        moa.add_domain("c")
    if variant == "MoA + a domain - another":
        moa.remove_domain("a")
    return moa


def tensors(model):
    """{name: (shape, dtype)} of every parameter and buffer."""
    return {name: (t.shape, t.dtype) for name, t in chain(model.named_parameters(), model.named_buffers())}


@pytest.mark.parametrize("speed", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_made_on_the_gpts_device(variant, speed):
    """A model built on a GPT on another device (meta here, a GPU in use) has every parameter and buffer of the
    same model built on the CPU, each on that device, and a training step (forward, backward) in every routing
    mode runs there: nothing is made on the CPU behind the GPT's back."""
    model = fast.enable(build(variant, "meta"), speed)
    assert tensors(model) == tensors(fast.enable(build(variant, "cpu"), speed))
    assert all(t.is_meta for t in chain(model.parameters(), model.buffers()))
    B, T = 3, 5
    idx = torch.zeros(B, T, dtype=torch.long, device="meta")
    ones = torch.ones(B, T, dtype=torch.bool, device="meta")
    calls = (
        [
            dict(mode=mode, domain=torch.zeros(B, dtype=torch.long, device="meta"), router_mask=ones, pad_mask=ones)
            for mode in MODES
        ]
        if isinstance(model, MoA)
        else [{}, dict(pad_mask=ones)]
    )
    for kwargs in calls:
        logits, loss = model(idx, idx, **kwargs)
        loss.backward()
        assert logits.is_meta and loss.is_meta, kwargs.get("mode")
    assert all(p.grad.is_meta for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "device, dtype, words",
    [
        ("tpu", "float32", ["--device=tpu", "auto, cpu, cuda, cuda:N or mps"]),
        ("cpu:0", "float32", ["--device=cpu:0"]),
        ("cuda", "float32", ["--device=cuda but", "--device=cpu"]),
        ("cuda:1", "float32", ["--device=cuda:1 but"]),
        ("mps", "float32", ["--device=mps but", "--device=cpu"]),
        ("cpu", "half", ["--dtype=half", "float32, bfloat16, float16"]),
        ("cpu", "float16", ["--dtype=float16 needs loss scaling", "bfloat16 or float32"]),
    ],
)
def test_a_device_or_dtype_that_cannot_run_is_a_user_error(device, dtype, words):
    """--device names a device that is not here (no GPU on the test machine), or --dtype one the device cannot
    run (float16 off CUDA has no loss scaling): a UserError that says so."""
    if torch.cuda.is_available() and device.startswith("cuda") or torch.backends.mps.is_available() and device == "mps":
        pytest.skip(f"{device} is here")
    with pytest.raises(UserError) as e:
        pick_device(device, dtype)
    for word in words:
        assert word in str(e.value)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Makes torch see one CUDA GPU without bfloat16 units (a T4); restores the TF32 setting afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_auto_picks_cuda_then_mps_then_cpu(fake_gpu, monkeypatch):
    """--device=auto is cuda when torch sees a GPU, else mps when it sees an Apple GPU, else cpu."""
    for gpu, apple, expected in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda apple=apple: apple)
        assert pick_device("auto")[0] == expected


def test_gpu_dtypes(fake_gpu):
    """On a GPU: float32 matmuls run on TF32 tensor cores; bfloat16 where the card has no bfloat16 units (it would
    only be emulated) is a UserError naming the card; float16 runs under autocast; a GPU index past the last is an
    error."""
    device, ctx = pick_device("cuda", "float32")
    assert device == "cuda" and isinstance(ctx, nullcontext) and torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(UserError, match="Tesla T4 has no bfloat16"):
        pick_device("cuda", "bfloat16")
    assert isinstance(pick_device("cuda", "float16")[1], torch.autocast)
    with pytest.raises(UserError, match="has 1 GPU"):
        pick_device("cuda:1")


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("NVIDIA A10G", None),
        ("Tesla T4", None),
    ],
)
def test_bench_names_the_cards_bf16_peak(monkeypatch, name, peak):
    """bench.py finds a card's dense bfloat16 peak by its name as torch reports it; another card has none (bench.py
    then measures one)."""
    import bench

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench.card_peak("cuda") == (name, peak)


def test_each_micro_batch_has_its_own_seed():
    """The seed of a micro-batch's random draws differs for every (run seed, step, micro-batch) and is the same
    each time it is asked for (it depends on nothing else, e.g. not on the process that computes it)."""
    grid = [(seed, step, micro) for seed in (0, 1, 1337) for step in range(20) for micro in range(8)]
    seeds = [micro_seed(*key) for key in grid]
    assert len(set(seeds)) == len(grid) and seeds == [micro_seed(*key) for key in grid]
    assert all(0 <= s < 2**64 for s in seeds)


def test_resume_keeps_the_loss_scale(tiny_data, tmp_path, monkeypatch):
    """A float16 run's loss scale is saved in the checkpoint and restored on resume: a resumed run ends with the
    scale of an uninterrupted one. (Here a CPU GradScaler that doubles the scale every step stands in for CUDA's.)"""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real("cpu", init_scale=2.0, growth_interval=1))
    args = TINY_BASE_ARGS + [f"--data_dir={tiny_data}", "--eval_interval=3"]
    train_base.main(args + [f"--out_dir={tmp_path / 'a'}", "--max_iters=6"])
    train_base.main(args + [f"--out_dir={tmp_path / 'b'}", "--max_iters=3"])
    train_base.main(args + [f"--out_dir={tmp_path / 'b'}", "--max_iters=6", "--init_from=resume"])
    scales = [torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["scaler"]["scale"] for run in "ab"]
    assert scales == [2.0 * 2**6] * 2


# ----------------------------------------------------------------------------------------------
# The scripts: one-line errors, and torchrun with their defaults.


TASK_ARGS = ["--batch_size=8", "--eval_iters=1", "--progress=False", "--seed=1", "--warmup_iters=1", "--device=cpu"]


@pytest.fixture(scope="module")
def experts(tiny_data, tiny_base, tmp_path_factory):
    """A folder with two experts (arith, reverse) on tiny_base, 2 steps each."""
    out = tmp_path_factory.mktemp("experts")
    for domain in ("arith", "reverse"):
        train_lora.main(
            TASK_ARGS
            + [
                f"--data_dir={tiny_data}",
                f"--base={tiny_base}",
                f"--out_dir={out}",
                f"--domain={domain}",
                "--max_iters=2",
            ]
        )
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_every_script_says_in_one_line_that_there_is_no_gpu(tiny_data, tiny_base, experts, tmp_path):
    """Every script that runs a model, asked for --device=cuda where there is none, exits with one line
    `error: --device=cuda but ...` (no traceback)."""
    data, base = f"--data_dir={tiny_data}", f"--base={tiny_base}"
    for script, *args in [
        ("train_base.py", data, f"--out_dir={tmp_path}"),
        ("train_lora.py", data, base, "--domain=arith", f"--out_dir={tmp_path}"),
        ("train_router.py", data, base, f"--experts={experts}", "--domains=arith,reverse", f"--out_dir={tmp_path}"),
        ("sample.py", base),
        ("results.py", f"--out={tmp_path}"),
        ("bench.py",),
        ("demo.py",),
    ]:
        assert_one_line_error(run_script(script, *args, "--device=cuda"), "--device=cuda but")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_gpu_check_refuses_without_a_gpu():
    """scripts/gpu_check.sh, where torch sees no CUDA GPU, stops at once with one line `error: ...` and status 1."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    env.pop("GPU_CHECK_DEVICE", None)
    result = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "scripts", "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert_one_line_error(result, "no CUDA GPU")
    assert result.stdout == ""


def read_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_readme_torchrun_commands_run_with_their_defaults(gloo, tiny_data, tiny_base, tmp_path):
    """`torchrun --nproc_per_node=2 train_base.py` and train_lora.py run with the default --grad_accum (one
    micro-batch per process), and only process 0 writes: the checkpoint, the expert, and one 'saved' line each."""
    base = torchrun(
        "train_base.py",
        *TINY_BASE_ARGS,
        f"--data_dir={tiny_data}",
        f"--out_dir={tmp_path / 'base'}",
        "--max_iters=2",
        "--eval_interval=2",
    )
    assert base.returncode == 0, base.stderr[-5000:]
    assert base.stdout.count("saved ") == 1 and [r["step"] for r in read_log(tmp_path / "base")] == [0, 2]
    expert = torchrun(
        "train_lora.py",
        *TASK_ARGS,
        f"--data_dir={tiny_data}",
        f"--base={tiny_base}",
        f"--out_dir={tmp_path / 'experts'}",
        "--domain=arith",
        "--max_iters=2",
        "--eval_interval=2",
    )
    assert expert.returncode == 0, expert.stderr[-5000:]
    assert expert.stdout.count("saved ") == 1 and os.path.isfile(tmp_path / "experts" / "arith.safetensors")


# Runs train_lora.py with dist.barrier wrapped: after the trainer's last barrier, process 0 starts an all-reduce of a
# tensor it drops at once, and process 1 joins that all-reduce only 2 s later. Meanwhile process 0 tears down, so a
# gloo worker thread finishes the all-reduce during the teardown, and must take the GIL to free the dropped tensor.
PENDING_AT_TEARDOWN = """import os, sys, time
sys.path.insert(0, {repo!r})
import torch
import torch.distributed as dist

barrier = dist.barrier


def barrier_then_pending_all_reduce(*args, **kwargs):
    barrier(*args, **kwargs)
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1), async_op=True)
    else:
        time.sleep(2)
        dist.all_reduce(torch.ones(1))


dist.barrier = barrier_then_pending_all_reduce
import train_lora

train_lora.main(sys.argv[1:])
sys.stdout.write(f"process {{os.environ['RANK']}} returned\\n")  # one write: the two processes share the pipe
"""


def test_torchrun_teardown_cannot_deadlock(gloo, tiny_data, tiny_base, tmp_path):
    """The end of a torchrun run does not join gloo's threads holding the GIL: with a collective still running in
    one of them when process 0 tears down (see PENDING_AT_TEARDOWN), both processes return within seconds. Freeing
    DDP only after the process group (its reducer then dropped the group's last reference) hung here in each of 3
    runs, and hung CI once at random, after the run had saved everything."""
    script = tmp_path / "pending.py"
    script.write_text(PENDING_AT_TEARDOWN.format(repo=REPO_ROOT))
    args = [*TASK_ARGS, f"--data_dir={tiny_data}", f"--base={tiny_base}", f"--out_dir={tmp_path / 'experts'}"]
    result = torchrun(str(script), *args, "--domain=arith", "--max_iters=2", "--eval_interval=2", timeout=90)
    assert result.returncode == 0, result.stderr[-5000:]
    assert sorted(line for line in result.stdout.splitlines() if "returned" in line) == [
        "process 0 returned",
        "process 1 returned",
    ], result.stdout


def test_train_router_on_two_processes_matches_one(gloo, tiny_data, tiny_base, experts, tmp_path):
    """train_router.py on 2 processes (torchrun, gloo, default --grad_accum: one micro-batch each) with every random
    draw it makes switched on (the records each micro-batch samples, LoRA dropout) logs the same losses (1e-5) and
    ends with the same bundle (1e-4) as 1 process with --grad_accum=2: the same global batch."""
    args = TASK_ARGS + [
        f"--data_dir={tiny_data}",
        f"--base={tiny_base}",
        f"--experts={experts}",
        "--domains=arith,reverse",
        "--lora_dropout=0.2",
        "--max_iters=4",
        "--eval_interval=1",
    ]
    ddp = torchrun("train_router.py", *args, f"--out_dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-5000:]
    assert ddp.stdout.count("saved ") == 1
    train_router.main(args + [f"--out_dir={tmp_path / 'one'}", "--grad_accum=2"])
    logs = read_log(tmp_path / "ddp" / "moa"), read_log(tmp_path / "one" / "moa")
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [0, 1, 2, 3, 4]
    for a, b in zip(*logs):
        for key in [k for k in b if k == "train_loss" or k.startswith("loss")]:
            if b[key] is not None:
                torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)
    ddp_bundle, one_bundle = (read_safetensors(str(tmp_path / run / "moa.safetensors"))[0] for run in ("ddp", "one"))
    assert ddp_bundle.keys() == one_bundle.keys()
    for name in one_bundle:
        torch.testing.assert_close(ddp_bundle[name], one_bundle[name], atol=1e-4, rtol=0, msg=name)


# ----------------------------------------------------------------------------------------------
# On a CUDA GPU only (scripts/gpu_check.sh runs them).


@cuda
def test_cuda_resume_equals_uninterrupted(tiny_data, tmp_path):
    """On a GPU, stopping at step 5 and resuming, with dropout on, gives the losses of never stopping (1e-4: GPU
    kernels may add in another order), in float32 and in float16 with the loss scale restored."""
    for dtype in ("float32", "float16"):
        args = [a for a in TINY_BASE_ARGS if a != "--device=cpu"] + [
            f"--data_dir={tiny_data}",
            "--device=cuda",
            f"--dtype={dtype}",
            "--dropout=0.1",
            "--eval_interval=5",
        ]
        _, losses_a = train_base.main(args + [f"--out_dir={tmp_path / dtype / 'a'}", "--max_iters=10"])
        _, losses_b1 = train_base.main(args + [f"--out_dir={tmp_path / dtype / 'b'}", "--max_iters=5"])
        _, losses_b2 = train_base.main(
            args + [f"--out_dir={tmp_path / dtype / 'b'}", "--max_iters=10", "--init_from=resume"]
        )
        torch.testing.assert_close(torch.tensor(losses_b1 + losses_b2), torch.tensor(losses_a), atol=1e-4, rtol=0)


@cuda
def test_cuda_moa_equals_cpu(monkeypatch):
    """A MoA with trained-looking experts gives on the GPU, in full float32, the logits it gives on the CPU (1e-4),
    plain and fast, on a mixed batch with labels and routed by its routers."""
    torch.manual_seed(0)
    moa = MoA(GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32)), ["a", "b", "c"], rank=4)
    randomize_B(moa)
    for r in moa.routers:
        torch.nn.init.normal_(r.weight, std=0.5)
    idx = torch.randint(257, (6, 40), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # full float32, as on the CPU
    with torch.no_grad():
        expected = {mode: moa.eval()(idx, domain=labels, mode=mode)[0] for mode in ("label", "layer")}
        gpu = moa.to("cuda")
        for speed in (False, True):
            fast.enable(gpu, speed)
            for mode, logits in expected.items():
                got = gpu(idx.cuda(), domain=labels.cuda(), mode=mode)[0].cpu()
                torch.testing.assert_close(got, logits, atol=1e-4, rtol=1e-4, msg=f"{mode}, fast={speed}")
