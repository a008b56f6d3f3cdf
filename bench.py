"""Benchmarks nanoMoA on this machine: base training (tokens/s, MFU), LoRA against full fine-tuning,
a mixed-domain batch through MoA, KV-cache generation, and the memory of each stage. Every figure that
involves experts is measured twice, side by side: the plain method (moa.py) and the speed paths
(fast.py, what the scripts run by default).

    python bench.py                    # ~4 minutes on 2 CPU cores; prints a table, writes out/bench/bench.json
    python bench.py --quick=True       # smoke run, under a minute (fewer repeats, smaller mid-size batch)
    python bench.py --device=cuda --dtype=bfloat16
    python bench.py --compile=True     # also times torch.compile on the base training step

On a GPU it also measures training's tokens/s and MFU against the card's dense bfloat16 peak (its data
sheet's, see BF16_PEAKS), at the default model and at GPT-2 small's shape, which can keep a GPU busy.

The machine may be shared with other jobs, so every figure is a ratio of things measured side by side
in the same run: interleaved (a, b, a, b, ...), each the median of --repeats timed calls after one
warm-up call. Inputs are random token ids: the time of a step does not depend on the data. Memory is
measured per stage in a fresh subprocess (`--stage=NAME`), which reports its own peak resident memory.

Read next: README.md (the figures, and the machine they were measured on).
"""

import copy
import json
import operator
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch

import fast
import train_router
from config import AT_LEAST_0, AT_LEAST_1, UserError, parse_config, run
from files import expert_tensors
from moa import LoRALinear, MoA, add_experts, lora_layers, set_route
from model import GPT, GPTConfig
from storage import write_text
from train_base import BaseConfig
from trainer import TrainConfig, make_optimizer, pick_device


@dataclass
class BenchConfig:
    out_dir: str = "out/bench"  # where bench.json goes
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "float32"  # float32 | bfloat16: the matmul peak and the base training step (autocast)
    compile: bool = False  # also time the base training step under torch.compile
    repeats: int = 5  # timed calls per figure (after one warm-up call); the median is kept
    quick: bool = False  # smoke run: 2 repeats, mid-size batch 4, 64 new tokens
    threads: int = 0  # torch threads; 0 keeps torch's default (one per core)
    stage: str = ""  # internal: run one stage's step in this process and print its peak memory

    CHECKS = {"repeats": AT_LEAST_1, "threads": AT_LEAST_0}


DEFAULT = {k: getattr(BaseConfig, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}  # train_base.py's
MID = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)  # on a GPU: a model that can fill it
# Dense (without sparsity) bfloat16 tensor-core peaks in FLOP/s, from NVIDIA's data sheets. The first name found
# as a word in torch.cuda.get_device_name() is the card; for any other card bench.py measures a bfloat16 matmul.
BF16_PEAKS = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # "H100": the SXM card
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]
VOCAB, BATCH = 257, BaseConfig.batch_size
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}


def sync(device):
    """Waits for the GPU's queued work: a GPU runs asynchronously, so a timer must stop only once it is done."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


@contextmanager
def exact_float32():
    """Full float32 matmuls inside (on a GPU pick_device allows TF32): for checks that two paths agree."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def timeit(fns, repeats, device):
    """Median seconds of each fn, called interleaved so that a burst of load from other jobs hits all alike."""
    for fn in fns:
        fn()  # warm-up: allocations, autotuning, compilation
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def gpt(shape, device, **overrides):
    torch.manual_seed(0)  # every model of a shape starts from the same weights
    return GPT(GPTConfig(vocab_size=VOCAB, **{**shape, **overrides})).to(device)


def tokens(batch, T, device):
    """Random token ids x and their next-token targets y, each (batch, T)."""
    ids = torch.randint(VOCAB, (batch, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    return ids[:, :-1], ids[:, 1:]


def autocast(device, dtype):
    return nullcontext() if dtype == "float32" else torch.autocast(device.split(":")[0], dtype=DTYPES[dtype])


def train_step(model, x, y, ctx=None, forward=lambda m, x, y: m(x, y)[1]):
    """One AdamW step (as trainer.py builds it) of model's trainable parameters on (x, y), as a function."""
    opt = make_optimizer(model, TrainConfig(), str(x.device))

    def step():
        with ctx or nullcontext():
            loss = forward(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class LoopLoRALinear(LoRALinear):
    """The obvious mixed batch, to compare with: in each layer, each expert present runs on its own samples."""

    def forward(self, x):
        if not torch.is_tensor(self.route):
            return super().forward(x)
        y = self.base(x)  # (B, T, out), fresh
        for k in self.route.unique().tolist():
            rows = self.route == k
            y[rows] += (x[rows] @ self.lora_A[k].t() @ self.lora_B[k].t()) * self.scale
        return y


class EinsumLoRALinear(LoRALinear):
    """The per-token mixture written as einsums over (B, T, K, r) and the stacked experts, to compare with moa.py's
    two matmuls of the experts side by side."""

    def forward(self, x):
        if not (torch.is_tensor(self.route) and self.route.dim() == 3):
            return super().forward(x)
        A, B = torch.stack(list(self.lora_A)), torch.stack(list(self.lora_B))  # (K, r, in), (K, out, r)
        z = torch.einsum("bti,kri->btkr", x, A)  # (B, T, K, r)
        return self.base(x) + torch.einsum("btkr,kor,btk->bto", z, B, self.route.to(z.dtype)) * self.scale


def lora(shape, device, speed=True):
    """The model of train_lora.py: a frozen GPT with one rank-8 expert on all four linear maps of every block."""
    model = add_experts(gpt(shape, device), 1, rank=8, alpha=16.0)
    set_route(model, 0)
    return fast.enable(model, speed)


def mixed_moa(device, n_experts=4, batch=32, **overrides):
    """A MoA with n_experts nonzero experts and a batch in which sample i uses expert i % n_experts."""
    moa = MoA(gpt(DEFAULT, device, **overrides), [f"domain{k}" for k in range(n_experts)], rank=8)
    for layer in lora_layers(moa):
        for B in layer.lora_B:
            torch.nn.init.normal_(B, std=0.02)  # trained experts are not zero
    x, y = tokens(batch, DEFAULT["block_size"], device)
    return moa, x, y, torch.arange(batch, device=device) % n_experts  # labels (batch,)


def model_flops(model, T):
    """Training FLOPs per token (nanoGPT's estimate_mfu, from PaLM's appendix B): 6 N for the matmuls
    of forward (2 N) and backward (4 N), N = parameters less the position embedding (the tied token
    embedding counts once, as the output head), plus 12 L T C for attention's QK^T and AV."""
    c = model.config
    n = model.num_params() - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * c.n_layer * T * c.n_embd


def row(rows, metric, value, unit="x", op=None, bound=None, plain=None):
    """One figure; `plain` is the same figure with the plain method when `value` is the speed paths'."""
    ok = None if op is None else bool(OPS[op](value, bound))
    rows.append(
        {
            "metric": metric,
            "value": value,
            "plain": plain,
            "unit": unit,
            "target": "" if op is None else f"{op} {bound:g}",
            "pass": ok,
        }
    )


def bench_base(cfg, rows):
    """Base training at the default config against this machine's peak: a big square matmul, same dtype."""
    n, B, T = 2048, BATCH, DEFAULT["block_size"]
    a, b = (torch.randn(n, n, device=cfg.device, dtype=DTYPES[cfg.dtype]) for _ in range(2))
    model = gpt(DEFAULT, cfg.device)
    fns = [lambda: a @ b, train_step(model, *tokens(B, T, cfg.device), autocast(cfg.device, cfg.dtype))]
    if cfg.compile:
        fns.append(train_step(torch.compile(model), *tokens(B, T, cfg.device), autocast(cfg.device, cfg.dtype)))
    t_mm, t_step, *t_compiled = timeit(fns, cfg.repeats, cfg.device)
    peak = 2 * n**3 / t_mm
    row(rows, f"matmul peak {n}^3 ({cfg.dtype})", peak / 1e9, "GFLOP/s")
    row(rows, "base training step", B * T / t_step, "tokens/s")
    cpu = cfg.device == "cpu"  # the target is the CPU's: on a GPU, see bench_gpu
    row(rows, "base training MFU", model_flops(model, T) * B * T / t_step / peak, "", ">=" if cpu else None, 0.40)
    if cfg.compile:
        row(rows, "torch.compile / eager, base training step", t_compiled[0] / t_step, "x", "<", 1.0)


def card_peak(device):
    """(the card's name, its dense bfloat16 peak in FLOP/s from BF16_PEAKS, or None for a card not listed)."""
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in BF16_PEAKS if re.search(rf"\b{key}\b", name, re.IGNORECASE)), None)


def bench_gpu(cfg, rows):
    """Training on a GPU against the card's dense bfloat16 peak: tokens/s and MFU at the default model (too small
    to keep a GPU busy: what a first run gets) and at GPT-2 small's shape, eager (and compiled with --compile)."""
    name, peak = card_peak(cfg.device)
    if peak is None:  # a card not in BF16_PEAKS: a big bfloat16 matmul stands in for its data sheet
        n = 8192
        a, b = (torch.randn(n, n, device=cfg.device, dtype=torch.bfloat16) for _ in range(2))
        peak, name = 2 * n**3 / timeit([lambda: a @ b], cfg.repeats, cfg.device)[0], f"{name} (measured)"
    row(rows, f"{name}: dense bfloat16 peak", peak / 1e12, "TFLOP/s")
    for label, shape, batch in (("default model", DEFAULT, BATCH), ("GPT-2 small shape", GPT2_SMALL, 8)):
        model, T = gpt(shape, cfg.device), shape["block_size"]
        x, y = tokens(batch, T, cfg.device)
        steps = {"eager": train_step(model, x, y, autocast(cfg.device, cfg.dtype))}
        if cfg.compile:
            steps["compiled"] = train_step(torch.compile(model), x, y, autocast(cfg.device, cfg.dtype))
        for how, t in zip(steps, timeit(list(steps.values()), cfg.repeats, cfg.device)):
            row(rows, f"GPU training, {label}, {cfg.dtype}, {how}", batch * T / t, "tokens/s")
            row(rows, "  its MFU against the bfloat16 peak", model_flops(model, T) * batch * T / t / peak, "")


def bench_autocast(cfg, rows, steps):
    """float32 against bfloat16 autocast: the same init and fixed batch, `steps` + 1 steps each."""
    x, y = tokens(BATCH, DEFAULT["block_size"], cfg.device)
    models = {dtype: gpt(DEFAULT, cfg.device) for dtype in DTYPES}
    t32, t16 = timeit([train_step(m, x, y, autocast(cfg.device, d)) for d, m in models.items()], steps, cfg.device)
    with torch.no_grad():
        l32, l16 = (m(x, y)[1].item() for m in models.values())  # both evaluated in float32
    row(rows, "bfloat16 autocast / float32, base training step", t16 / t32, "x", "<", 1.0)
    row(rows, f"bfloat16 / float32 loss after {steps + 1} steps - 1", abs(l16 / l32 - 1), "", "<=", 0.01)


def bench_lora(cfg, rows, shape, batch, bound):
    """A LoRA step, plain and fast, against a full fine-tuning step of the same model on the same batch."""
    x, y = tokens(batch, shape["block_size"], cfg.device)
    t_full, t_plain, t_fast = timeit(
        [
            train_step(gpt(shape, cfg.device), x, y),
            train_step(lora(shape, cfg.device, False), x, y),
            train_step(lora(shape, cfg.device), x, y),
        ],
        cfg.repeats,
        cfg.device,
    )
    name = "/".join(str(shape[k]) for k in ("n_layer", "n_embd", "block_size"))
    row(
        rows,
        f"LoRA / full fine-tuning step, L/C/T {name}, B {batch}",
        t_fast / t_full,
        "x",
        "<=",
        bound,
        t_plain / t_full,
    )


@torch.no_grad()
def bench_moa(cfg, rows):
    """Inference on a mixed batch (32 samples, 4 experts, each sample its own, labels given), plain and fast,
    against the base model and two obvious ways: a loop over experts, and one sample at a time."""
    plain, x, _, labels = mixed_moa(cfg.device)
    plain.eval()
    quick = fast.enable(copy.deepcopy(plain))
    base = gpt(DEFAULT, cfg.device).eval()

    def mixed(moa, runs=True):  # runs=False: the fast path without sorted runs (the in-place gather)
        for layer in lora_layers(quick):
            layer.min_run_rows = fast.FastLoRALinear.min_run_rows if runs else float("inf")
        return moa(x, domain=labels, mode="label")[0]  # (B, T, vocab)

    looped = copy.deepcopy(plain)
    for layer in lora_layers(looped):
        layer.__class__ = LoopLoRALinear

    def loop(moa):
        return moa(x, domain=labels, mode="label")[0]

    def one_at_a_time(moa):
        return [moa(x[i : i + 1], domain=labels[i : i + 1], mode="label") for i in range(len(x))]

    with exact_float32():
        for check in (mixed(quick), mixed(quick, runs=False), loop(looped)):  # the same numbers
            torch.testing.assert_close(check, mixed(plain), rtol=1e-4, atol=1e-4)
    times = timeit(
        [
            lambda: base(x),
            lambda: mixed(plain),
            lambda: mixed(quick),
            lambda: mixed(quick, runs=False),
            lambda: loop(looped),
            lambda: one_at_a_time(plain),
            lambda: one_at_a_time(quick),
        ],
        cfg.repeats,
        cfg.device,
    )
    t_base, t_plain, t_fast, t_gather, t_loop, t_single_plain, t_single_fast = times
    row(rows, "MoA mixed batch / base model (B 32, 4 experts)", t_fast / t_base, "x", "<=", 1.15, t_plain / t_base)
    row(rows, "  the same without sorted runs (the gather) / base", t_gather / t_base, "x", plain=t_plain / t_base)
    row(rows, "loop over experts in each layer / MoA mixed batch", t_loop / t_fast, "x", ">", 1.0, t_loop / t_plain)
    row(rows, "one sample at a time / MoA mixed batch", t_single_fast / t_fast, "x", ">", 1.0, t_single_plain / t_plain)


def bench_token(cfg, rows):
    """A training step of MoE-LoRA (train_router.py --mode=token: 5 experts, each token mixing its top 2, the routers
    and experts training) against MoA's (--mode=label, each sample its expert), and against the mixture as einsums."""
    moa, x, y, labels = mixed_moa(cfg.device, n_experts=5)
    moa.top_k = train_router.RouterConfig.top_k
    einsum = copy.deepcopy(moa)
    for layer in lora_layers(einsum):
        layer.__class__ = EinsumLoRALinear
    with exact_float32():
        torch.testing.assert_close(einsum(x, y, mode="token")[1], moa(x, y, mode="token")[1], rtol=1e-5, atol=1e-5)

    def step(model, domain, mode):  # MoE-LoRA naive has no L_cls (--eta=0): no labels
        model = fast.enable(copy.deepcopy(model))
        return train_step(model, x, y, forward=lambda m, x, y: m(x, y, domain=domain, mode=mode)[1])

    labelled, token, einsums = timeit(
        [step(moa, labels, "label"), step(moa, None, "token"), step(einsum, None, "token")], cfg.repeats, cfg.device
    )
    row(rows, "MoE-LoRA training step (per token) / MoA's (labels)", token / labelled, "x")
    row(rows, "  the mixture as einsums / as moa.py's two matmuls", einsums / token, "x", ">", 1.0)


@torch.no_grad()
def bench_generate(cfg, rows, new_tokens, prompt_len=32):
    """Greedy decoding of one sequence with the KV cache against recomputing the whole context each step,
    and MoA's (plain and fast) against the base model's."""
    model = gpt(DEFAULT, cfg.device, block_size=prompt_len + new_tokens).eval()  # room for every new token
    prompt = tokens(1, prompt_len, cfg.device)[0]

    def generate(use_cache):
        return model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)

    plain = mixed_moa(cfg.device, block_size=prompt_len + new_tokens)[0].eval()  # what sample.py runs with a bundle
    quick = fast.enable(copy.deepcopy(plain))

    def generate_moa(moa):
        return moa.generate(prompt, new_tokens, temperature=0, mode="last")

    with exact_float32():
        assert torch.equal(generate(True), generate(False)), "the KV cache changed the greedy tokens"
        assert torch.equal(generate_moa(plain), generate_moa(quick)), "the speed paths changed the greedy tokens"
    t_cache, t_full, t_plain, t_fast = timeit(
        [lambda: generate(True), lambda: generate(False), lambda: generate_moa(plain), lambda: generate_moa(quick)],
        cfg.repeats,
        cfg.device,
    )
    row(rows, f"recompute / KV cache, {new_tokens} new tokens (same tokens)", t_full / t_cache, "x", ">=", 5.0)
    row(
        rows,
        "MoA generation (4 experts, mode last) / base, KV cache",
        t_fast / t_cache,
        "x",
        "<=",
        1.10,
        t_plain / t_cache,
    )


STAGES = {  # device -> the step whose peak memory is measured (None: importing torch and nanoMoA only)
    "import": lambda device: None,
    "base training": lambda device: train_step(gpt(DEFAULT, device), *tokens(BATCH, DEFAULT["block_size"], device)),
    "LoRA training": lambda device: train_step(lora(DEFAULT, device), *tokens(BATCH, DEFAULT["block_size"], device)),
    "MoA training (B 32, 4 experts)": lambda device: moa_training_step(device),
    "generation, KV cache": lambda device: (
        lambda: gpt(DEFAULT, device).eval().generate(tokens(1, 32, device)[0], 96, temperature=0)
    ),
}


def moa_training_step(device):
    moa, x, y, labels = mixed_moa(device)
    return train_step(fast.enable(moa), x, y, forward=lambda m, x, y: m(x, y, domain=labels, mode="label")[1])


def bench_memory(cfg, rows):
    """Peak resident memory of each stage, each in a fresh process; bytes of one expert against the base."""
    for stage in STAGES:
        args = [
            sys.executable,
            os.path.abspath(__file__),
            f"--stage={stage}",
            f"--device={cfg.device}",
            f"--threads={cfg.threads}",
        ]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"stage {stage!r} failed:\n{done.stderr}")
        row(rows, f"peak memory: {stage}", json.loads(done.stdout.splitlines()[-1])["peak_mb"], "MB")
    model = lora(DEFAULT, cfg.device)
    expert = sum(t.numel() * t.element_size() for t in expert_tensors(model, 0).values())
    base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    row(rows, "bytes of one expert (rank 8) / bytes of the base", expert / base, "x")


def run_stage(cfg):
    step = STAGES[cfg.stage](cfg.device)
    for _ in range(2 if step else 0):
        step()
    with open("/proc/self/status") as f:  # VmHWM, the peak RSS of this process image (ru_maxrss survives exec)
        peak_mb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024  # kB -> MB
    if cfg.device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20  # on a GPU, the GPU's memory is what runs out
    print(json.dumps({"peak_mb": peak_mb}))


def bench_stage1(cfg, rows, steps):
    """K experts trained in one run (train_lora.py --domain=a,b,...) against K runs of one expert each, the same
    steps on the same data, one thread: the run's wall time less its evaluations. Then the transfer matrix's
    LoRAs (each task alone and with each other one) in one run against one run each. On the built-in tasks,
    prepared small in a temporary folder, over a random base (the time of a step does not depend on weights)."""
    import tempfile

    import data.prepare
    import train_base
    import train_lora
    import trainer

    with tempfile.TemporaryDirectory() as tmp, single_thread():
        data.prepare.main([f"--out_dir={tmp}/data", "--records=2000", "--val_records=16", "--max_tokens=20000"])
        train_base.main([f"--data_dir={tmp}/data", f"--out_dir={tmp}/base", "--max_iters=0", "--progress=False"])
        tasks = ["upper", "lower", "double", "reverse", "arith"]
        pairs = [f"{a}+{b}" for i, a in enumerate(tasks[:3]) for b in tasks[i + 1 : 3]]

        def seconds(domain, name):  # the training steps' time: the loop's, less its two evaluations
            timed = []
            real = trainer.one_step

            def one_step(*args):
                t = time.perf_counter()
                out = real(*args)
                timed.append(time.perf_counter() - t)
                return out

            trainer.one_step = one_step
            try:
                train_lora.main(
                    [
                        f"--data_dir={tmp}/data",
                        f"--base={tmp}/base",
                        f"--domain={domain}",
                        f"--name={name}",
                        f"--out_dir={tmp}/{name}",
                        f"--max_iters={steps}",
                        f"--eval_interval={steps}",
                        "--eval_iters=1",
                        "--progress=False",
                        f"--device={cfg.device}",
                    ]
                )
            finally:
                trainer.one_step = real
            return sum(timed)

        for what, loras, bound in (
            ("stage 1, 5 experts", tasks, 0.6),
            ("transfer matrix, 3 tasks", tasks[:3] + pairs, None),
        ):
            together = seconds(",".join(loras), "together")
            alone = sum(seconds(d, d.replace("+", "_")) for d in loras)
            op = None if bound is None else "<="
            row(rows, f"{what}: in one run / one run each (1 thread)", together / alone, op=op, bound=bound)


@contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def machine(cfg):
    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def main(argv=None):
    cfg = parse_config(BenchConfig, argv or [])
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype={cfg.dtype}: use one of {', '.join(DTYPES)}")
    cfg.device = pick_device(cfg.device, cfg.dtype)[0]  # auto -> the device (the --stage processes get it as is)
    if cfg.stage not in ("", *STAGES):
        raise UserError(f"--stage={cfg.stage}: use one of {', '.join(STAGES)}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.stage:
        return run_stage(cfg)
    if cfg.quick:
        cfg.repeats = min(cfg.repeats, 2)
    rows, t0 = [], time.time()
    bench_base(cfg, rows)
    if cfg.device.startswith("cuda"):
        bench_gpu(cfg, rows)
    bench_autocast(cfg, rows, steps=2 if cfg.quick else 9)
    bench_lora(cfg, rows, DEFAULT, BATCH, 1.0)
    bench_lora(cfg, rows, MID, 4 if cfg.quick else BATCH, 0.85)
    bench_moa(cfg, rows)
    bench_token(cfg, rows)
    bench_generate(cfg, rows, new_tokens=64 if cfg.quick else 256)
    bench_stage1(cfg, rows, steps=5 if cfg.quick else 30)
    bench_memory(cfg, rows)

    info = machine(cfg)
    print(
        f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, {info['gpu'] or 'no GPU'}, "
        f"torch {info['torch']}, load average {info['load_average'][0]:.2f}, {time.time() - t0:.0f} s"
    )
    print(f"{'metric':<58} {'plain':>8} {'fast / value':>16} {'target':>8}  ok")
    for r in rows:
        value = f"{r['value']:.3g} {r['unit']}".strip()
        plain = "-" if r["plain"] is None else f"{r['plain']:.3g}"
        ok = "-" if r["pass"] is None else "yes" if r["pass"] else "NO"
        print(f"{r['metric']:<58} {plain:>8} {value:>16} {r['target']:>8}  {ok}")
    path = os.path.join(cfg.out_dir, "bench.json")
    write_text(
        path,
        json.dumps(
            {"machine": info, "config": asdict(cfg), "seconds": round(time.time() - t0, 1), "rows": rows}, indent=1
        ),
    )
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    run(main)
