"""The training machinery every stage shares, written once: the settings every stage has, the device,
the optimizer and its schedule, and the training loop itself.

train_base.py, train_lora.py and train_router.py each build their model and say how a batch turns
into a loss; `train` does the rest, in named phases: resume, evaluate and log (with the plateau rule
that can stop a run), one step (gradient accumulation, clipping, warmup + cosine or constant learning
rate, autocast), checkpoint; optional torch.compile, DistributedDataParallel under torchrun, and an
atomic checkpoint that `--init_from=resume` continues exactly. Several units (experts) can train side
by side in one run, each clipped and stopped on its own. `pick_device` is how every script turns
--device and --dtype into a device (auto: cuda, then mps, then cpu). The data and its batches are in
batches.py.

Read next: evaluate.py, then train_base.py.
"""

import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from batches import JointData
from config import (
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    NAMES,
    POSITIVE,
    UserError,
    check_memory,
    one_of,
    setting,
)
from storage import atomic_write, load_checkpoint, locked, save_checkpoint, write_bytes

# ----------------------------------------------------------------------------------------------
# Settings: each script's config dataclass extends this one (config.py parses the flags).


@dataclass
class TrainConfig:
    """Fields every stage has; each script subclasses it with its own."""

    out_dir: str = "out/run"  # where the run writes (its checkpoint, log and outputs)
    data_dir: str = "data/default"  # a data set written by data/prepare.py
    init_from: str = "scratch"  # scratch | resume (continue out_dir/ckpt.pt)
    seed: int = 1337  # every random draw of the run follows from it (weights, records, dropout)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast; float16 on CUDA only, with loss scaling)
    compile: bool = False  # torch.compile the model (a GPU speed-up)
    fast: bool = True  # fast.py's speed paths (False: the plain method of moa.py; the same numbers)
    batch_size: int = 16  # sequences per micro-batch
    block_size: int = 128  # the context: tokens per window (the base), or longest record (tasks)
    grad_accum: int = 0  # micro-batches per step over all processes (a multiple of them); 0: one per process
    max_iters: int = 1200  # optimizer steps (with --stop_flat: at most)
    lr_decay_iters: int = 0  # 0: same as max_iters
    learning_rate: float = 3e-3  # the peak learning rate, after warmup
    min_lr: float = 3e-4  # where the cosine schedule ends
    warmup_iters: int = 50  # steps of linear warmup
    weight_decay: float = 0.1  # AdamW decay of the matrices
    beta1: float = 0.9  # AdamW's betas
    beta2: float = 0.99  # (beta1's second)
    grad_clip: float = 1.0  # clip each parameter group's gradient norm to this (0: no clipping)
    eval_interval: int = 300  # steps between evaluations (each a log line and a checkpoint)
    eval_iters: int = 4  # batches' worth of validation windows or records per domain, per evaluation
    log_interval: int = 50  # steps the progress bar's loss averages over
    progress: bool = True  # tqdm progress bar
    schedule: str = "cosine"  # cosine: warmup, then cosine decay to min_lr | constant: warmup, then learning_rate
    stop_flat: float = 0.0  # > 0: stop once the best validation loss of the last 20% of steps (3 evaluations at
    # least) is not this much (relatively) below the best before them: a plateau (see `flat`); max_iters: the cap
    stop_after: int = 0  # the plateau rule waits for this many steps (0: 5 evaluations)

    # each field's bound, enforced by config.parse_config
    CHECKS = {
        "batch_size": AT_LEAST_1,
        "block_size": AT_LEAST_1,
        "grad_accum": AT_LEAST_0,
        "max_iters": AT_LEAST_0,
        "lr_decay_iters": AT_LEAST_0,
        "learning_rate": POSITIVE,
        "min_lr": AT_LEAST_0,
        "warmup_iters": AT_LEAST_0,
        "weight_decay": AT_LEAST_0,
        "beta1": FRACTION,
        "beta2": FRACTION,
        "grad_clip": AT_LEAST_0,
        "eval_interval": AT_LEAST_1,
        "eval_iters": AT_LEAST_1,
        "log_interval": AT_LEAST_1,
        "schedule": one_of("cosine", "constant"),
        "stop_flat": FRACTION,
        "stop_after": AT_LEAST_0,
    }


@dataclass
class TaskConfig(TrainConfig):
    """Fields of the stages that train on tasks (experts and routers) beside a frozen base."""

    base: str = "out/base"  # a train_base.py output folder / ckpt.pt, or GPT-2 weights (gpt2, or a folder)
    domains: str = "all"  # comma-separated tasks, or "all" (every prepared task but the held-back ones)
    prompt_loss: bool = False  # also take the loss on the prompt's tokens (default: the response's only)
    block_size: int = 0  # longest record in tokens (longer ones are cut); 0: the base's context
    schedule: str = "constant"  # constant: every checkpoint is what a shorter run would give (see save_at)
    save_at: str = ""  # comma-separated steps at which to also save what the run trains, as <name>@<step>
    max_iters: int = 1000  # the cap: a run stops earlier at its plateau (--stop_flat)
    stop_flat: float = 0.02  # train to the plateau: see TrainConfig (0: exactly --max_iters steps)
    eval_interval: int = 50

    CHECKS = {"init_from": one_of("scratch", "resume"), "block_size": AT_LEAST_0, "domains": NAMES}


def save_steps(cfg):
    """--save_at as a set of steps, checked."""
    try:
        steps = {int(s) for s in cfg.save_at.split(",") if s.strip()}
    except ValueError:
        raise UserError(f"--save_at={cfg.save_at}: expected comma-separated steps") from None
    if any(s < 1 or s > cfg.max_iters for s in steps):
        raise UserError(f"--save_at={cfg.save_at}: steps must be within 1 .. --max_iters={cfg.max_iters}")
    return steps


def task_block_size(cfg, model):
    """--block_size of a task stage, checked against the base's context (0: the base's context)."""
    if cfg.block_size > model.config.block_size:
        raise UserError(f"--block_size={cfg.block_size} is beyond the base's context of {model.config.block_size}")
    return cfg.block_size or model.config.block_size


def training_bytes(config, batch_size, block_size, trainable):
    """A lower bound of the bytes one training step takes: the trainable parameters, their gradients and AdamW's two
    moments (4 float32 copies), and what autograd keeps for the backward of a (B, T) batch: about 12 floats per token
    and channel in each block (layer norms, q, k, v, attention and MLP outputs, the 4C-wide MLP input) and the logits
    with their softmax, 2 V per token. The frozen weights, attention scores and temporaries come on top."""
    activations = batch_size * block_size * (12 * config.n_layer * config.n_embd + 2 * config.vocab_size)
    return 4 * (4 * trainable + activations)


def check_training_memory(cfg, config, trainable, flags=("batch_size", "block_size")):
    """A UserError naming `flags` (with their values) when a training step of a GPT of `config` with `trainable`
    parameters, at cfg's batch and block size, cannot fit in this machine's free memory: said before allocating."""
    need = training_bytes(config, cfg.batch_size, cfg.block_size or config.block_size, trainable)
    check_memory(need, " ".join(f"--{flag}={getattr(cfg, flag)}" for flag in flags))


# ----------------------------------------------------------------------------------------------
# Devices, optimizer, schedule.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device="auto", dtype="float32"):
    """--device and --dtype, checked -> (device, autocast context). auto: cuda, then mps, then cpu.

    A device that is not there, or a dtype it cannot run, is a one-line UserError, the same in every script.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
        raise UserError(f"--device={device}: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise UserError(f"--device={device} but {why}; use --device=cpu (or auto)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device={device} but this machine has {torch.cuda.device_count()} GPU(s), cuda:0 and on")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but torch sees no Apple GPU here; use --device=cpu (or auto)")
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype}: use one of {', '.join(DTYPES)}")
    if dtype == "float16" and kind != "cuda":
        raise UserError(
            f"--dtype=float16 needs loss scaling, which nanoMoA does on CUDA only; on {kind} use "
            "--dtype=bfloat16 or float32"
        )
    if kind == "cuda":
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise UserError(
                f"--dtype=bfloat16 but the {torch.cuda.get_device_name(device)} has no bfloat16 units; "
                "use --dtype=float16 (loss-scaled) or float32"
            )
        # float32 matmuls on TF32 tensor cores (a 10-bit mantissa, as nanoGPT does): several times faster from
        # Ampere on, and training does not notice. Under autocast the matmuls run in bfloat16 / float16 anyway.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, nullcontext() if dtype == "float32" else torch.autocast(kind, dtype=DTYPES[dtype])


def processes():
    """(rank, world size) of this process: torchrun puts them in the environment; (0, 1) without it."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return torchrun_variables(os.environ)
    return 0, 1


TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets in every process


def torchrun_variables(env):
    """(RANK, WORLD_SIZE) of an environment that has either, checked to be as torchrun sets them: both whole numbers
    with RANK < WORLD_SIZE, LOCAL_RANK (if there) one too, and for more than one process MASTER_ADDR and MASTER_PORT,
    where the processes meet. Else a UserError: a variable left over from another job would otherwise end in a
    traceback deep inside torch.distributed."""
    ranks = [env.get("RANK", ""), env.get("WORLD_SIZE", ""), env.get("LOCAL_RANK", "0")]
    whole = all(r.isascii() and r.isdigit() for r in ranks) and int(ranks[0]) < int(ranks[1])
    meet = not whole or int(ranks[1]) == 1 or all(env.get(name) for name in ("MASTER_ADDR", "MASTER_PORT"))
    if not (whole and meet):
        given = " ".join(f"{name}={env[name]!r}" for name in TORCHRUN if name in env)
        raise UserError(
            f"{given}: not as torchrun sets them (RANK < WORLD_SIZE, whole numbers; MASTER_ADDR and MASTER_PORT "
            "for more than one process): start with torchrun, or unset them to run one process"
        )
    return int(ranks[0]), int(ranks[1])


def micro_batches(cfg):
    """Micro-batches per optimizer step, over all processes: --grad_accum, or (0, the default) one per process."""
    return cfg.grad_accum or processes()[1]


def setup_device(cfg):
    """-> (device, autocast context, rank, world size). Under torchrun each process takes the GPU of its
    local rank first, then joins the process group (NCCL binds to the current GPU; gloo runs on CPUs)."""
    rank, world = processes()
    device, ctx = pick_device(cfg.device, cfg.dtype)
    if world > 1:
        if device.startswith("mps"):
            raise UserError("torchrun runs DDP on cuda (NCCL) or cpu (gloo), not on mps: use one process")
        if device.startswith("cuda"):
            local, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
            if local >= gpus:
                raise UserError(
                    f"torchrun started more processes on this machine than its {gpus} GPU(s): "
                    f"use --nproc_per_node={gpus}"
                )
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, ctx, rank, world


def make_optimizer(model, cfg, device, lr_scales=None):
    """AdamW over the trainable parameters; matrices decay, biases and LayerNorm gains don't.

    lr_scales {name prefix: factor}: those parameters follow the schedule at factor x its rate.
    """
    groups = {}  # (lr scale, weight decay) -> parameters
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((f for prefix, f in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)
            groups.setdefault((scale, cfg.weight_decay if p.dim() >= 2 else 0.0), []).append(p)
    param_groups = [{"params": ps, "lr_scale": scale, "weight_decay": decay} for (scale, decay), ps in groups.items()]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(param_groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def learning_rate(step, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, or (schedule constant) the peak rate."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "constant":
        return cfg.learning_rate
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def trainable_state(model):
    """The parameters that train, by name: all of them for the base, only experts/routers later."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


# What a resumed run may change: where and how it runs, how often it reports, and how long it goes on (more steps;
# with --lr_decay_iters=0 the cosine then stretches to the new end). data_dir and base are compared by what they
# hold (data_identity, the base's fingerprint), so they may move. Every other setting must be the saved run's.
RESUME_MAY_CHANGE = (
    "out_dir",
    "data_dir",
    "base",
    "init_from",
    "max_iters",
    "device",
    "compile",
    "fast",
    "progress",
    "log_interval",
    "eval_interval",
    "eval_iters",
    "save_at",
)


def data_identity(data):
    """What a run's data is, as a SHA-256: its domains in order (a label is a place in it), meta.json's tokenizer,
    seed and entries for those domains, the length of each token file and each task's record index (start, prompt
    length and length of every record); for runs side by side (batches.JointData), every run's. Data prepared again
    with another seed or other records has another identity; the same data moved to another folder keeps it."""
    if hasattr(data, "parts"):
        parts = [data_identity(d) for datas in data.parts for d in datas]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    meta, domains = getattr(data, "meta", {}), list(getattr(data, "domains", []))
    entries = {kind: {d: meta[kind][d] for d in domains if d in meta.get(kind, {})} for kind in ("corpus", "tasks")}
    digest = hashlib.sha256(json.dumps([domains, meta.get("tokenizer"), meta.get("seed"), entries]).encode())
    for store in ("splits", "tokens", "index"):  # CorpusData.splits; TaskData.tokens and .index
        for key, array in sorted(getattr(data, store, {}).items()):
            digest.update(f"{store} {key} {len(array)}".encode())
            if store == "index":
                digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def check_resume(path, saved, cfg, meta, identity):
    """The run saved at `path` (its checkpoint's meta) is the run this one describes: the same settings but those of
    RESUME_MAY_CHANGE, the same `meta` (kind, model, domains, the base's fingerprint...) and the same data. Else a
    UserError naming the first difference: resuming would go on silently with the saved run's model and state."""
    old, new = saved.get("config"), asdict(cfg)
    if not isinstance(old, dict):
        raise UserError(f"{path} records no settings to compare this run's with: start a new run in another --out_dir")
    for key in sorted(set(old) | set(new)):
        if key not in RESUME_MAY_CHANGE and old.get(key) != new.get(key):
            raise UserError(
                f"{path} was trained with {key}={old.get(key)!r}, this run has "
                f"{setting(key, new.get(key), 'the command line')}: resume with the run's settings (only "
                f"{', '.join(RESUME_MAY_CHANGE[3:])} may change), or start a new run in another --out_dir"
            )
    for key, value in (meta or {}).items():  # init_from: train_base.py's (resume now, scratch or gpt2 then)
        if key != "init_from" and saved.get(key) != value:
            raise UserError(f"{path} is a run with {key} {saved.get(key)!r}, this one has {value!r}: start a new run")
    if saved.get("data") != identity:
        raise UserError(
            f"{path} was trained on other data than --data_dir={cfg.data_dir} holds (prepared again, or other "
            "tasks): resume on the data it was trained on, or start a new run in another --out_dir"
        )


def check_optimizer_state(optimizer, saved, path):
    """The optimizer state loaded from `path` (`saved`, as in the file) fits its parameters: each moment of its
    parameter's shape, floating-point in the file (load_state_dict casts silently) and finite. load_state_dict checks
    none of it: a wrong shape would fail only at the first step."""
    for state in saved["state"].values():
        for name, t in state.items():
            if torch.is_tensor(t) and not t.is_floating_point():
                raise UserError(f"{path}: the optimizer's {name} is {t.dtype}, not floating-point")
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, t in optimizer.state.get(p, {}).items():
                if torch.is_tensor(t) and t.dim() and t.shape != p.shape:
                    raise UserError(
                        f"{path}: the optimizer's {name} is {tuple(t.shape)}, its parameter {tuple(p.shape)}"
                    )
                if torch.is_tensor(t) and not (t.is_floating_point() and torch.isfinite(t).all()):
                    raise UserError(f"{path}: the optimizer's {name} is {t.dtype} or holds NaN or inf values")


def check_finite_weights(model, step):
    """The trainable weights are finite at `step`, or a UserError: a run whose training diverged logs and saves
    nothing more, and the checkpoint of an earlier step stays as it was."""
    for name, p in trainable_state(model).items():
        if not torch.isfinite(p).all():
            raise UserError(
                f"training diverged before step {step}: {name} holds NaN or inf values; nothing was saved (an earlier "
                "checkpoint is kept): try a lower --learning_rate or --grad_clip"
            )


def trim_log(path, step):
    """Keeps the log's lines up to `step`, the checkpoint's. A run killed after logging a step but before its
    checkpoint was saved would log that step again when resumed; a half-written last line is dropped too."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        kept = []
        for line in f:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
    atomic_write(path, lambda tmp: write_bytes(tmp, "".join(kept).encode()))


# ----------------------------------------------------------------------------------------------
# The loop.


class Unit(NamedTuple):
    """What stops on its own plateau. Most runs train one unit; train_lora.py trains several experts side by side,
    each a unit with its own clipping and its own plateau, exactly as its own run would train it (each draws its own
    records, JointData); stage 2 stops its experts and its routers apart, on the losses that train each. A stopped
    unit's parameters stay as they are while the others train on."""

    name: str  # evaluate() reports its validation loss as f"watch/{name}" (for the plateau rule)
    groups: dict  # name -> parameters: each group clipped to --grad_clip on its own (routers apart from experts)


def flat(history, fraction):
    """The plateau rule on [(step, validation loss)]: the best loss of the last 20% of steps (at least the last
    3 evaluations, so one noisy evaluation decides nothing) is less than `fraction` (relatively) below the best
    loss before them."""
    step = history[-1][0]
    window = min(len(history) - 1, max(3, sum(s > 0.8 * step for s, _ in history)))
    before, recent = history[:-window], history[-window:]
    return bool(before) and min(loss for _, loss in recent) > (1 - fraction) * min(loss for _, loss in before)


def default_loss(model, batch):
    return model(batch.x, batch.y)[1]


def micro_seed(seed, step, micro):
    """The seed of every random draw of one micro-batch (its records, its dropout masks): a function of the run's
    seed, the step and the micro-batch's index in the step, and of nothing else. So N processes draw what one
    process draws with the same global batch, and a resumed run needs the step number, not a saved random state."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{micro}".encode()).digest()[:8], "little")


class Run:
    """The state of one training run: the model (and its DDP / compiled wrapper), the optimizer, the step, each
    unit's validation history and whether it has stopped, the losses since the last log line."""

    def __init__(self, cfg, model, units, device, lr_scales):
        self.cfg, self.raw, self.model, self.units = cfg, model, model, units
        self.optimizer = make_optimizer(model, cfg, device, lr_scales)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.dtype == "float16")  # float16 runs on CUDA only
        self.step, self.losses, self.t0 = 0, [], time.time()
        self.history = {u.name: [] for u in units}  # unit -> [(step, validation loss)]
        self.norms = {}  # parameter group -> its gradient norms since the last log line
        self.stopped = {}  # unit -> the step it stopped at (its plateau)
        self.identity = None  # the data's (data_identity), kept in every checkpoint
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")

    def active(self):
        return [u.name not in self.stopped for u in self.units]

    def recent_loss(self):
        return float(torch.stack(self.losses[-self.cfg.log_interval :]).mean()) if self.losses else None

    def checkpoint(self, metrics, meta):
        state = {
            "model": trainable_state(self.raw),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),  # empty unless float16
            "meta": json.dumps(
                {
                    "step": self.step,
                    "config": asdict(self.cfg),
                    "metrics": metrics,
                    "data": self.identity,
                    **(meta or {}),
                }
            ),
        }
        save_checkpoint(self.ckpt_path, state)


def resume(run, master, meta, identity):
    """--init_from=resume: the weights, optimizer state and step of out_dir/ckpt.pt, once the saved run is checked to be
    this one (check_resume); the log is cut back to the checkpoint's step and read back into each unit's history, so
    the plateau rule goes on where it was."""
    path = run.ckpt_path
    ckpt = load_checkpoint(path)
    check_resume(path, ckpt["meta"], run.cfg, meta, identity)
    missing = set(trainable_state(run.raw)) ^ set(ckpt["model"])  # either way: a tensor left out, or one unread
    if missing:
        what = "lacks" if sorted(missing)[0] in trainable_state(run.raw) else "holds"
        raise UserError(f"{path} does not match this model: it {what} {sorted(missing)[0]}")
    try:
        run.raw.load_state_dict(ckpt["model"], strict=False)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        check_optimizer_state(run.optimizer, ckpt["optimizer"], path)
        if ckpt.get("scaler"):  # a float16 run's loss scale, where it had got to
            run.scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"{path} does not match this model: {str(e).splitlines()[0]}") from None
    step = ckpt["meta"].get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= run.cfg.max_iters:
        raise UserError(f"{path} is at step {step!r}; resuming needs 0 to --max_iters={run.cfg.max_iters}")
    run.step = step
    if master:
        trim_log(run.log_path, step)
    for record in read_log(run.log_path):
        watch_losses(run, record)


def read_log(path):
    """The JSON records of a run's log, one per line (none if there is no log)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def watch_losses(run, metrics):
    """Adds each active unit's validation loss to its history; a unit whose history is flat stops here."""
    cfg = run.cfg
    for unit in run.units:
        key = f"watch/{unit.name}"
        if unit.name in run.stopped or key not in metrics:
            continue
        run.history[unit.name].append((metrics["step"], metrics[key]))
        waited = metrics["step"] >= (cfg.stop_after or 5 * cfg.eval_interval)
        if cfg.stop_flat > 0 and waited and flat(run.history[unit.name], cfg.stop_flat):
            run.stopped[unit.name] = metrics["step"]


def evaluate_and_log(run, evaluate, ctx, bar, meta):
    """Evaluates the model, logs a line to out_dir/log.jsonl, applies the plateau rule, saves the checkpoint."""
    check_finite_weights(run.raw, run.step)  # before anything is logged or saved
    run.raw.eval()
    with ctx:
        metrics = evaluate(run.raw)
    run.raw.train()
    record = {
        "step": run.step,
        "train_loss": run.recent_loss(),
        "lr": learning_rate(run.step, run.cfg),
        "time_s": round(time.time() - run.t0, 2),
        **{f"grad_norm/{name}": float(torch.stack(norms).mean()) for name, norms in run.norms.items() if norms},
        **metrics,
    }
    run.norms = {}
    watch_losses(run, record)
    record["stopped"] = sorted(run.stopped)
    with open(run.log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    run.checkpoint(metrics, meta)
    line = f"step {run.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    bar.write(line) if bar is not None else print(line)


def one_step(run, data, loss_fn, ctx, device, rank, world):
    """One optimizer step: this process's micro-batches, gradients all-reduced (DDP), each unit clipped on its
    own; a unit that has stopped draws no records and its parameters are left as they are."""
    cfg, model = run.cfg, run.model
    n_micro = micro_batches(cfg)
    lr = learning_rate(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    active = run.active()
    total = torch.zeros((), device=device)  # this process's share of the step's loss
    for micro in range(rank, n_micro, world):  # this process's micro-batches; the others compute the rest
        # The global generator, reseeded, draws the dropout masks of the base (not the experts': see batches.py).
        seed = micro_seed(cfg.seed, run.step, micro)
        torch.manual_seed(seed)
        joint = {"active": active} if isinstance(data, JointData) else {}  # which runs still draw records
        batch = data.batch(cfg.batch_size, seed, **joint).to(device)
        sync = micro + world >= n_micro  # DDP: all-reduce gradients on the last micro-batch only
        with nullcontext() if sync or world == 1 else model.no_sync(), ctx:
            loss = loss_fn(model, batch) / (n_micro // world)
        run.scaler.scale(loss).backward()
        total += loss.detach()
    if world > 1:
        dist.all_reduce(total)  # the sum of every process's mean
        total /= world
    clip_and_step(run, active)
    run.losses.append(total)
    run.step += 1
    return lr


def clip_and_step(run, active):
    """Each unit's groups clipped to --grad_clip on their own (their norms before clipping kept for the log),
    stopped units' gradients dropped, then the update."""
    run.scaler.unscale_(run.optimizer)
    for unit, on in zip(run.units, active):
        for name, params in unit.groups.items():
            if not on:
                for p in params:
                    p.grad = None  # AdamW leaves a parameter without a gradient as it is
            elif run.cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip)
                run.norms.setdefault(name, []).append(norm.detach())
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def train(
    cfg, model, data, evaluate, loss_fn=default_loss, meta=None, lr_scales=None, finish=None, units=None, snapshot=None
):
    """Trains `model`'s trainable parameters for cfg.max_iters steps (fewer if every unit reaches its plateau,
    with --stop_flat); returns the per-step losses.

    evaluate(model) -> {name: float} runs at every eval_interval and at the last step; each result is a line
    of out_dir/log.jsonl and the checkpoint out_dir/ckpt.pt is rewritten after it. `meta` (JSON-able) is stored
    in the checkpoint beside the config, e.g. the model's architecture. lr_scales: see make_optimizer.
    units: see Unit (default: one unit, all trainable parameters clipped together). finish(model, steps) runs
    once after the last step, steps = {unit: steps it trained}, e.g. to write the expert; snapshot(model, step,
    active) at each step of --save_at, active[i] telling whether unit i still trains. While it runs, out_dir is
    locked (files.locked): a second run on the same out_dir stops with an error before it touches anything there.

    Under torchrun, process r computes micro-batches r, r + N, ... of each step (N processes), and only
    process 0 evaluates, logs, checkpoints and runs finish; the others wait for it at the end.
    """
    check_training_memory(cfg, model.config, sum(p.numel() for p in model.parameters() if p.requires_grad))
    with locked(cfg.out_dir) if processes()[0] == 0 else nullcontext():  # process 0 holds the lock for all
        return train_loop(cfg, model, data, evaluate, loss_fn, meta, lr_scales, finish, units, snapshot)


def train_loop(cfg, model, data, evaluate, loss_fn, meta, lr_scales, finish, units, snapshot):
    """The loop of `train`, its out_dir locked: resume or start, then evaluate, snapshot, step until done."""
    device, ctx, rank, world = setup_device(cfg)
    if micro_batches(cfg) % world:
        raise UserError(f"--grad_accum={cfg.grad_accum} must be a multiple of the {world} processes (or 0: one each)")
    master, save_at = rank == 0, save_steps(cfg) if hasattr(cfg, "save_at") else set()
    identity = data_identity(data)
    model.to(device)
    units = units or [Unit("", {"all": [p for p in model.parameters() if p.requires_grad]})]
    run = Run(cfg, model, units, device, lr_scales)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.init_from == "resume":
        resume(run, master, meta, identity)
    elif master and os.path.exists(run.log_path):
        os.remove(run.log_path)  # a fresh run starts a fresh log
    run.identity = identity
    resumed_at = run.step if cfg.init_from == "resume" else None
    if cfg.compile:
        run.model = torch.compile(run.model)
    if world > 1:
        run.model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device] if device.startswith("cuda") else None
        )
    bar = progress_bar(cfg, run.step) if master else None
    while True:
        due = run.step % cfg.eval_interval == 0 or run.step == cfg.max_iters
        if master and due and run.step != resumed_at:
            evaluate_and_log(run, evaluate, ctx, bar, meta)
        share_stops(run, world)
        if master and snapshot is not None and run.step in save_at:
            snapshot(run.raw, run.step, run.active())
        if run.step == cfg.max_iters or not any(run.active()):
            break
        lr = one_step(run, data, loss_fn, ctx, device, rank, world)
        if bar is not None:
            bar.update(1)
            if run.step % cfg.log_interval == 0:
                bar.set_postfix(loss=f"{run.recent_loss():.4f}", lr=f"{lr:.1e}")
    if bar is not None:
        bar.close()
    if master and finish is not None:
        finish(run.raw, {u.name: run.stopped.get(u.name, run.step) for u in units})
    if world > 1:
        dist.barrier()  # the others wait until process 0 has written everything
        # DDP goes first. Were it freed after the group (when this function returns), its reducer would drop the
        # group's last reference and join gloo's worker threads holding the GIL, while one of them may still need
        # the GIL to free a tensor of the last collective: a deadlock, seen on busy machines after all was saved.
        run.model = None
        dist.destroy_process_group()
    return torch.stack(run.losses).tolist() if run.losses else []


def share_stops(run, world):
    """Under torchrun, process 0 decides which units have stopped; every process then trains the same ones."""
    if world > 1:
        stopped = [run.stopped]
        dist.broadcast_object_list(stopped, src=0)
        run.stopped = stopped[0]


def progress_bar(cfg, step):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.max_iters, initial=step, desc=os.path.basename(cfg.out_dir.rstrip("/")), dynamic_ncols=True)
