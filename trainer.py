"""The training machinery every stage shares, written once: the settings every stage has, data and
batches, the optimizer and its schedule, and the training loop itself.

train_base.py, train_lora.py and train_router.py each build their model and say how a batch turns
into a loss; `train` does the rest: gradient accumulation, clipping, warmup + cosine learning rate,
autocast, optional torch.compile, DistributedDataParallel under torchrun, periodic evaluation with a
JSONL log, and an atomic checkpoint that `--init_from=resume` continues exactly. `pick_device` is how
every script turns --device and --dtype into a device (auto: cuda, then mps, then cpu).

Read next: evaluate.py, then train_base.py.
"""

import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from config import (
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    NAMES,
    POSITIVE,
    UserError,
    check_memory,
    is_name,
    one_of,
    setting,
)
from files import atomic_write, load_checkpoint, locked, read_json, save_checkpoint, write_bytes

# ----------------------------------------------------------------------------------------------
# Settings: each script's config dataclass extends this one (config.py parses the flags).


@dataclass
class TrainConfig:
    """Fields every stage has; each script subclasses it with its own."""

    out_dir: str = "out/run"
    data_dir: str = "data/default"
    init_from: str = "scratch"  # scratch | resume (continue out_dir/ckpt.pt)
    seed: int = 1337
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast; float16 on CUDA only, with loss scaling)
    compile: bool = False
    fast: bool = True  # fast.py's speed paths (False: the plain method of moa.py; the same numbers)
    batch_size: int = 16  # sequences per micro-batch
    block_size: int = 128
    grad_accum: int = 0  # micro-batches per step over all processes (a multiple of them); 0: one per process
    max_iters: int = 1200
    lr_decay_iters: int = 0  # 0: same as max_iters
    learning_rate: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 300
    eval_iters: int = 4  # batches' worth of validation windows or records per domain, per evaluation
    log_interval: int = 50
    progress: bool = True  # tqdm progress bar

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
    }


@dataclass
class TaskConfig(TrainConfig):
    """Fields of the stages that train on tasks (experts and routers) beside a frozen base."""

    base: str = "out/base"  # a train_base.py output folder / ckpt.pt, or GPT-2 weights (gpt2, or a folder)
    domains: str = "all"  # comma-separated tasks, or "all" (every prepared task but the held-back ones)
    prompt_loss: bool = False  # also take the loss on the prompt's tokens (default: the response's only)
    block_size: int = 0  # longest record in tokens (longer ones are cut); 0: the base's context

    CHECKS = {"init_from": one_of("scratch", "resume"), "block_size": AT_LEAST_0, "domains": NAMES}


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
# Data, as data/prepare.py writes it: <data_dir>/corpus/<source>/{train,val}.bin (token streams, for the
# base), <data_dir>/tasks/<domain>/{train,val}.{bin,idx} (records, for the experts and routers), meta.json.


class Batch(NamedTuple):
    x: torch.Tensor  # (B, T) input token ids
    y: torch.Tensor  # (B, T) targets: the next token, -1 where no loss is taken
    domain: torch.Tensor  # (B,) each sample's domain label (task, or corpus source)
    prompt: torch.Tensor | None = None  # (B, T) bool, True on a record's prompt: what the routers may read

    def to(self, device):
        return Batch(*(None if t is None else t.to(device) for t in self))


def read_data_meta(data_dir):
    """<data_dir>/meta.json, checked: what every reader of the data relies on is there, of its type."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `python data/prepare.py` first")
    meta = read_json(path)
    if not (
        all(isinstance(meta.get(k), dict) for k in ("corpus", "tasks"))
        and isinstance(meta.get("tokenizer"), str)
        and all(isinstance(meta.get(k), int) for k in ("vocab_size", "eot"))
        and 1 <= meta["vocab_size"] <= 2**16
        and 0 <= meta["eot"] < meta["vocab_size"]
        and isinstance(meta.get("held_back", []), list)
    ):
        raise UserError(f"{path} is not a meta.json written by data/prepare.py; run it again")
    odd = next((n for kind in ("corpus", "tasks") for n in meta[kind] if not is_name(n)), None)
    if odd is not None:  # each name is a folder of data_dir: never a path out of it
        raise UserError(f"{path} names {odd!r}, not a name of letters, digits, _ and -; run data/prepare.py again")
    return meta


def read_tokens(path, vocab_size):
    """A .bin file of uint16 token ids, memory-mapped, checked: a whole number of ids, each below vocab_size."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: run `python data/prepare.py` again")
    size = os.path.getsize(path)
    if size % 2:
        raise UserError(
            f"{path} is corrupt ({size} bytes, not a whole number of uint16 token ids); run "
            f"`python data/prepare.py` again"
        )
    tokens = np.memmap(path, dtype=np.uint16, mode="r") if size else np.zeros(0, np.uint16)  # mmap: not empty
    if size and tokens.max() >= vocab_size:
        raise UserError(
            f"{path} holds token id {tokens.max()}, beyond the vocabulary of {vocab_size} of its "
            f"meta.json; run `python data/prepare.py` again"
        )
    return tokens


def choose(names, known, held_back, kind):
    """--domains-style selection: "all" is every known name but the held-back ones; else a comma list."""
    chosen = (
        [n for n in known if n not in held_back]
        if names == "all"
        else [n.strip() for n in names.split(",") if n.strip()]
    )
    for name in chosen:
        if name not in known:
            raise UserError(f"unknown {kind} {name!r}; prepared: {', '.join(known) or 'none'}")
        if chosen.count(name) > 1:  # one label per name: a second would make an expert or bundle its loader refuses
            raise UserError(f"{kind} {name!r} is selected twice in {names!r}")
    if not chosen:
        raise UserError(f"no {kind} selected: prepare some with `python data/prepare.py`")
    return chosen


class CorpusData:
    """Memory-mapped token streams of the corpus sources (what the base is pretrained on), and batches
    of random windows with every source equally represented."""

    def __init__(self, data_dir, sources="all", block_size=128):
        self.meta = read_data_meta(data_dir)
        self.domains = choose(sources, list(self.meta["corpus"]), [], "corpus source")
        self.block_size = block_size
        self.tokenizer, self.vocab_size = self.meta["tokenizer"], self.meta["vocab_size"]
        self.splits = {}
        for name in self.domains:
            for split in ("train", "val"):
                path = os.path.join(data_dir, "corpus", name, f"{split}.bin")
                tokens = read_tokens(path, self.vocab_size)
                if len(tokens) < block_size + 2:
                    raise UserError(f"{path} has {len(tokens)} tokens, fewer than one block of {block_size + 1}")
                self.splits[name, split] = tokens

    def windows(self, name, split, starts):
        """Token windows starting at `starts` -> x, y (len(starts), block_size) int64, y = x shifted by one."""
        data, T = self.splits[name, split], self.block_size
        x = torch.from_numpy(np.stack([data[s : s + T].astype(np.int64) for s in starts]))
        y = torch.from_numpy(np.stack([data[s + 1 : s + 1 + T].astype(np.int64) for s in starts]))
        return x, y

    def batch(self, batch_size, generator, split="train"):
        """A random batch with every source equally represented (counts differ by at most one)."""
        d = balanced_labels(batch_size, len(self.domains), generator)
        xs, ys = [], []
        for label in d.tolist():
            n = len(self.splits[self.domains[label], split]) - self.block_size - 1
            x, y = self.windows(self.domains[label], split, [int(torch.randint(n, (1,), generator=generator))])
            xs.append(x)
            ys.append(y)
        return Batch(torch.cat(xs), torch.cat(ys), d)

    def eval_starts(self, name, n):
        """n fixed window starts spread evenly over a source's validation split (no randomness)."""
        last = len(self.splits[name, "val"]) - self.block_size - 1
        return np.linspace(0, last, n).astype(np.int64).tolist()


def balanced_labels(batch_size, K, generator):
    """(B,) labels 0..K-1 in turn from a random offset: every label equally often, to within one."""
    offset = int(torch.randint(K, (1,), generator=generator))
    return (torch.arange(batch_size) + offset) % K


class TaskData:
    """The (prompt, response) records of several tasks, the domains MoA routes between, and right-padded
    batches of them with every domain equally represented. The loss is taken on the response tokens
    (and the EOT that ends it) only, unless prompt_loss; `Batch.prompt` marks each record's prompt."""

    def __init__(self, data_dir, domains="all", block_size=128, prompt_loss=False):
        self.meta = read_data_meta(data_dir)
        self.domains = choose(domains, list(self.meta["tasks"]), self.meta.get("held_back", []), "domain")
        self.block_size, self.prompt_loss = block_size, prompt_loss
        self.tokenizer, self.vocab_size, self.eot = self.meta["tokenizer"], self.meta["vocab_size"], self.meta["eot"]
        self.tokens, self.index = {}, {}
        for name in self.domains:
            for split in ("train", "val", "calib"):  # calib: the built-in tasks' held-out phrasing, if there
                if split != "calib" or os.path.isfile(os.path.join(data_dir, "tasks", name, "calib.idx")):
                    self.tokens[name, split], self.index[name, split] = read_records(
                        data_dir, name, split, self.vocab_size
                    )

    def count(self, name, split):
        return len(self.index[name, split]) if (name, split) in self.index else 0

    def record(self, name, split, i):
        """Record i -> (prompt token ids, response token ids ending with EOT), as lists."""
        start, n_prompt, length = self.index[name, split][i].tolist()
        tokens = self.tokens[name, split][start : start + length].tolist()
        return tokens[:n_prompt], tokens[n_prompt:]

    def pad(self, records, domain):
        """[(prompt, response)] -> a right-padded Batch; records longer than block_size + 1 tokens are cut."""
        rows = [(p + r)[: self.block_size + 1] for p, r in records]
        T = max(len(row) for row in rows) - 1
        x = torch.full((len(rows), T), self.eot, dtype=torch.long)
        y = torch.full((len(rows), T), -1, dtype=torch.long)
        prompt = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, (row, (p, _)) in enumerate(zip(rows, records)):
            n = len(row) - 1
            x[b, :n], y[b, :n] = torch.tensor(row[:-1]), torch.tensor(row[1:])
            prompt[b, : min(len(p), n)] = True
            if not self.prompt_loss:
                y[b, : len(p) - 1] = -1  # targets that are prompt tokens: no loss
        return Batch(x, y, domain, prompt)

    def batch(self, batch_size, generator, split="train"):
        """A random batch of records with every domain equally represented (counts differ by at most one)."""
        d = balanced_labels(batch_size, len(self.domains), generator)
        records = []
        for label in d.tolist():
            name = self.domains[label]
            records.append(
                self.record(name, split, int(torch.randint(self.count(name, split), (1,), generator=generator)))
            )
        return self.pad(records, d)


def check_records_fit(data):
    """Each task's training records against the context (data.block_size positions: a record of n tokens, its EOT
    included, fills n - 1): a warning on stderr counting those that are cut, and a UserError when none of a task's
    records keeps a token to train on (without --prompt_loss: each prompt alone fills the context)."""
    for name in data.domains:
        _, n_prompt, length = data.index[name, "train"].T
        cut, lost = int((length - 1 > data.block_size).sum()), int((n_prompt > data.block_size).sum())
        if lost == len(length) and not data.prompt_loss:
            raise UserError(
                f"task {name!r}: every training record's prompt fills the context of {data.block_size} tokens (the "
                f"shortest prompt is {n_prompt.min()}), so nothing would train; shorten the prompts, or use a base "
                "with a longer context"
            )
        if cut:
            print(
                f"warning: task {name!r}: {cut} of {len(length)} training records are longer than the context of "
                f"{data.block_size} tokens (the longest needs {length.max() - 1}) and are cut"
                + (f"; {lost} of them lose their whole response" if lost else ""),
                file=sys.stderr,
            )


def read_records(data_dir, name, split, vocab_size):
    """A task split's tokens (uint16, memory-mapped) and index (N, 3): start, prompt length, length; checked."""
    folder = os.path.join(data_dir, "tasks", name)
    bin_path, idx_path = os.path.join(folder, f"{split}.bin"), os.path.join(folder, f"{split}.idx")
    if not os.path.isfile(idx_path):
        raise UserError(f"{idx_path} not found: run `python data/prepare.py` again")
    tokens = read_tokens(bin_path, vocab_size)
    size = os.path.getsize(idx_path)
    if size == 0 or size % 24:
        raise UserError(
            f"{idx_path} is corrupt ({size} bytes, not rows of 3 int64); run `python data/prepare.py` again"
        )
    index = np.fromfile(idx_path, dtype=np.int64).reshape(-1, 3)
    start, n_prompt, length = index.T
    if (start < 0).any() or (n_prompt < 1).any() or (length <= n_prompt).any() or (start + length > len(tokens)).any():
        raise UserError(f"{idx_path} does not match {bin_path}: corrupt; run `python data/prepare.py` again")
    return tokens, index


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
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
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
)


def data_identity(data):
    """What a run's data is, as a SHA-256: its domains in order (a label is a place in it), meta.json's tokenizer,
    seed and entries for those domains, the length of each token file and each task's record index (start, prompt
    length and length of every record). Data prepared again with another seed or other records has another identity;
    the same data moved to another folder keeps it."""
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


def default_loss(model, batch):
    return model(batch.x, batch.y)[1]


def micro_seed(seed, step, micro):
    """The seed of every random draw of one micro-batch (its records, its dropout masks): a function of the run's
    seed, the step and the micro-batch's index in the step, and of nothing else. So N processes draw what one
    process draws with the same global batch, and a resumed run needs the step number, not a saved random state."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{micro}".encode()).digest()[:8], "little")


def train(cfg, model, data, evaluate, loss_fn=default_loss, meta=None, lr_scales=None, finish=None):
    """Trains `model`'s trainable parameters for cfg.max_iters steps; returns the per-step losses.

    evaluate(model) -> {name: float} runs at every eval_interval and at the last step; each result is
    a line of out_dir/log.jsonl and the checkpoint out_dir/ckpt.pt is rewritten after it. `meta`
    (JSON-able) is stored in the checkpoint beside the config, e.g. the model's architecture.
    lr_scales: see make_optimizer. finish(model) runs once after the last step, e.g. to write the expert.
    While it runs, out_dir is locked (files.locked): a second run on the same out_dir stops with an error
    before it touches anything there.

    Under torchrun, process r computes micro-batches r, r + N, ... of each step (N processes), and only
    process 0 evaluates, logs, checkpoints and runs finish; the others wait for it at the end.
    """
    check_training_memory(cfg, model.config, sum(p.numel() for p in model.parameters() if p.requires_grad))
    with locked(cfg.out_dir) if processes()[0] == 0 else nullcontext():  # process 0 holds the lock for all
        return train_loop(cfg, model, data, evaluate, loss_fn, meta, lr_scales, finish)


def train_loop(cfg, model, data, evaluate, loss_fn, meta, lr_scales, finish):
    """The loop of `train`, its out_dir locked."""
    device, ctx, rank, world = setup_device(cfg)
    n_micro = micro_batches(cfg)
    if n_micro % world:
        raise UserError(f"--grad_accum={cfg.grad_accum} must be a multiple of the {world} processes (or 0: one each)")
    master = rank == 0
    identity = data_identity(data)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device, lr_scales)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.dtype == "float16")  # float16 runs on CUDA only
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    step = 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        check_resume(ckpt_path, ckpt["meta"], cfg, meta, identity)
        missing = set(trainable_state(model)) ^ set(ckpt["model"])  # either way: a tensor left out, or one unread
        if missing:
            what = "lacks" if sorted(missing)[0] in trainable_state(model) else "holds"
            raise UserError(f"{ckpt_path} does not match this model: it {what} {sorted(missing)[0]}")
        try:
            model.load_state_dict(ckpt["model"], strict=False)
            optimizer.load_state_dict(ckpt["optimizer"])
            check_optimizer_state(optimizer, ckpt["optimizer"], ckpt_path)
            if ckpt.get("scaler"):  # a float16 run's loss scale, where it had got to
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise UserError(f"{ckpt_path} does not match this model: {str(e).splitlines()[0]}") from None
        step = ckpt["meta"].get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= cfg.max_iters:
            raise UserError(f"{ckpt_path} is at step {step!r}; resuming needs 0 to --max_iters={cfg.max_iters}")
        if master:
            trim_log(log_path, step)
    elif master and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.startswith("cuda") else None
        )

    def checkpoint(metrics):
        state = {
            "model": trainable_state(raw_model),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),  # empty unless float16
            "meta": json.dumps(
                {"step": step, "config": asdict(cfg), "metrics": metrics, "data": identity, **(meta or {})}
            ),
        }
        save_checkpoint(ckpt_path, state)

    losses, t0 = [], time.time()  # losses: one 0-dim tensor per step, read only when logged (no sync per step)

    def recent_loss():
        return float(torch.stack(losses[-cfg.log_interval :]).mean()) if losses else None

    bar = None
    if master and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.max_iters, initial=step, desc=os.path.basename(cfg.out_dir.rstrip("/")), dynamic_ncols=True
        )
    while True:
        last_step = step == cfg.max_iters
        if master and (step % cfg.eval_interval == 0 or last_step) and not (cfg.init_from == "resume" and not losses):
            check_finite_weights(raw_model, step)  # before anything is logged or saved
            raw_model.eval()
            with ctx:
                metrics = evaluate(raw_model)
            raw_model.train()
            record = {
                "step": step,
                "train_loss": recent_loss(),
                "lr": learning_rate(step, cfg),
                "time_s": round(time.time() - t0, 2),
                **metrics,
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            checkpoint(metrics)
            line = f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            bar.write(line) if bar is not None else print(line)
        if last_step:
            break
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        total = torch.zeros((), device=device)  # this process's share of the step's loss
        for micro in range(rank, n_micro, world):  # this process's micro-batches; the others compute the rest
            # The global generator, reseeded: the micro-batch's records are drawn from it, then its dropout masks
            # (on a GPU from CUDA's generator, which manual_seed reseeds too).
            generator = torch.manual_seed(micro_seed(cfg.seed, step, micro))
            batch = data.batch(cfg.batch_size, generator).to(device)
            sync = micro + world >= n_micro  # DDP: all-reduce gradients on the last micro-batch only
            with nullcontext() if sync or world == 1 else model.no_sync(), ctx:
                loss = loss_fn(model, batch) / (n_micro // world)
            scaler.scale(loss).backward()
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)  # the sum of every process's mean
            total /= world
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        step += 1
        if bar is not None:
            bar.update(1)
            if step % cfg.log_interval == 0:
                bar.set_postfix(loss=f"{recent_loss():.4f}", lr=f"{lr:.1e}")
    if bar is not None:
        bar.close()
    if master and finish is not None:
        finish(raw_model)
    if world > 1:
        dist.barrier()  # the others wait until process 0 has written everything
        # DDP goes first. Were it freed after the group (when this function returns), its reducer would drop the
        # group's last reference and join gloo's worker threads holding the GIL, while one of them may still need
        # the GIL to free a tensor of the last collective: a deadlock, seen on busy machines after all was saved.
        model = None
        dist.destroy_process_group()
    return torch.stack(losses).tolist() if losses else []
