"""Shared fixtures: a tiny prepared data set and a tiny trained base, each built once per test session.

Both take a few seconds on a CPU, so every test file can train and evaluate real models. The models
are tiny, so one thread is fastest; with more, a busy machine makes each matmul wait for a core.
Also registers the markers assignment1..6, which select the tests that grade each course assignment
(`python -m pytest -q tests -m assignmentN`); holds `torchrun`, for the tests that run scripts on 2 processes
(gloo, on the CPU), and the helpers the grading tests share.
"""

import os
import signal
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for the subprocesses the tests start

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
torch.set_num_threads(1)

# The course (assignments/README.md): `python -m pytest -q tests -m assignmentN` grades assignment N.
ASSIGNMENTS = {
    1: "the LoRA layer: one expert's forward and its merge",
    2: "a mixed batch: each sample through its own expert",
    3: "the routers and their domain-label loss L_cls",
    4: "routing at inference: the decision made at prefill, kept while decoding",
    5: "adding and removing a domain",
    6: "optional: the speed paths of fast.py",
}


def pytest_configure(config):
    for n, what in ASSIGNMENTS.items():
        config.addinivalue_line("markers", f"assignment{n}: grades assignment {n}, {what}")


def assert_one_line_error(result, *words):
    """A CLI run failed the way a user error must: exit 1, one stderr line "error: ...", no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def randomize_B(model, seed=1, std=0.1):
    """Gives every expert a non-zero B, so the experts actually change the output."""
    from moa import lora_layers

    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            for B in layer.lora_B:
                B.normal_(0.0, std)


def randomize_biases(model, seed=2, std=0.1):
    """Gives every nn.Linear of model a non-zero bias (GPT's init zeroes them), so that code dropping a bias, or
    adding one twice, changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, std)


class RecordOps(TorchDispatchMode):
    """Records each tensor operation run inside `with RecordOps() as recorded:`, in recorded.ops as (name, shapes of
    the tensors it returns, whether it only views its input): how a computation is done, for the handout's rules
    (no Python loop over samples, no (out, in) product)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.ops.append((func.__name__, shapes, func.is_view))
        return out


def ops_of(fn, *args):
    """[(name, shapes, is_view)] of the tensor operations run while fn(*args) ran, views included (indexing one
    sample is a view: a loop over samples shows in the count of every operation)."""
    with RecordOps() as recorded:
        fn(*args)
    return recorded.ops


TINY_BASE_ARGS = [
    "--n_layer=2",
    "--n_embd=32",
    "--n_head=2",
    "--block_size=64",
    "--batch_size=8",
    "--eval_iters=1",
    "--progress=False",
    "--device=cpu",
]


# the flags of the stage-1 and stage-2 runs the tests make on the tiny base: small batches, the plain method
TASK_FLAGS = ["--batch_size=8", "--eval_iters=1", "--progress=False", "--device=cpu", "--seed=1", "--fast=False"]


def train_tiny_experts(data, base, folder, domains):
    """Stage-1 experts of `domains` on the tiny base, 20 steps each, written into `folder` (train_lora.py)."""
    import train_lora

    for domain in domains:
        args = [f"--data_dir={data}", f"--base={base}", f"--out_dir={folder}", f"--domain={domain}"]
        train_lora.main(TASK_FLAGS + args + ["--max_iters=20", "--eval_interval=20", "--warmup_iters=2"])


def bundle_and_addition(data, base, out, router_flags):
    """arith, reverse and count experts in out/experts (train_tiny_experts), a bundle over arith and reverse
    (routers only, out/moa.safetensors) and count added to it (out/moa+count.safetensors), train_router.py with
    `router_flags` -> (the bundle's MoA, the MoA with count, the flags every run shared)."""
    import train_router

    flags = TASK_FLAGS + [f"--data_dir={data}", f"--base={base}", f"--experts={out / 'experts'}", f"--out_dir={out}"]
    train_tiny_experts(data, base, out / "experts", ("arith", "reverse", "count"))
    moa, _ = train_router.main(flags + router_flags + ["--domains=arith,reverse", "--train_experts=False"])
    added, _ = train_router.main(flags + router_flags + ["--add_domain=count", f"--bundle={out / 'moa.safetensors'}"])
    return moa, added, flags


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A data folder with the built-in corpus (python, cpp, prose: ~20k tokens each) and tasks (upper, double,
    reverse, arith, held-back count: 2000 training and 64 validation records each)."""
    from data.prepare import main as prepare

    out = str(tmp_path_factory.mktemp("data"))
    prepare([f"--out_dir={out}", "--max_tokens=20000", "--records=2000", "--val_records=64"])
    return out


@pytest.fixture(scope="session")
def tiny_base(tiny_data, tmp_path_factory):
    """Path of the ckpt.pt of a 2-layer base (context 64) trained for 100 steps on tiny_data's corpus."""
    import train_base

    out = str(tmp_path_factory.mktemp("base"))
    train_base.main(
        TINY_BASE_ARGS + ["--max_iters=100", "--eval_interval=50", f"--data_dir={tiny_data}", f"--out_dir={out}"]
    )
    return os.path.join(out, "ckpt.pt")


def run_script(script, *args, timeout=120):
    """Runs `python script *args` (script: a path in the repo) in the repo folder -> the finished process, its
    output captured."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


GLOO_PROBE = """import torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
dist.destroy_process_group()
"""


def torchrun(*args, timeout=300):
    """Runs `torchrun --standalone --nproc_per_node=2 *args` in the repo, one thread per process -> the finished
    process. One still running after `timeout` s is stopped: each worker first prints every thread's stack
    (faulthandler, on SIGABRT), stderr then ends with a line saying so, and the return code is not 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in children(proc.pid):  # the workers: torchrun starts each in a session of its own
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:  # ended meanwhile
                pass
        try:
            out, err = proc.communicate(timeout=60)  # torchrun sees its workers fail and ends
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        err += f"\n[torchrun had not ended after {timeout} s: stopped, the workers' stacks above]"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def children(pid):
    """The ids of the processes whose parent is pid (read from /proc; none where there is no /proc)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # not a process, or one that has just ended
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state; the name may hold spaces
            found.append(int(entry))
    return found


@pytest.fixture(scope="session")
def gloo(tmp_path_factory):
    """Skips the tests that use it unless a trivial 2-process gloo run (init, barrier) works here, probed once per
    session; after that, any failure of theirs fails."""
    probe = tmp_path_factory.mktemp("probe") / "probe.py"
    probe.write_text(GLOO_PROBE)
    probed = torchrun(str(probe), timeout=120)
    if probed.returncode != 0:
        pytest.skip(f"torchrun cannot run 2 gloo processes here: {(probed.stderr.strip().splitlines() or ['?'])[-1]}")
