"""The training machinery every stage shares, written once: the settings every stage has, data and
batches, the optimizer and its schedule, and the training loop itself.

train_base.py, train_lora.py and train_router.py each build their model and say how a batch turns
into a loss; `train` does the rest: gradient accumulation, clipping, warmup + cosine learning rate,
autocast, optional torch.compile, DistributedDataParallel under torchrun, periodic evaluation with a
JSONL log, and an atomic checkpoint that `--init_from=resume` continues exactly.

Read next: evaluate.py, then train_base.py.
"""
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from config import UserError
from files import load_checkpoint, save_checkpoint


# ----------------------------------------------------------------------------------------------
# Settings: each script's config dataclass extends this one (config.py parses the flags).

@dataclass
class TrainConfig:
    """Fields every stage has; each script subclasses it with its own."""
    out_dir: str = "out/run"
    data_dir: str = "data/default"
    domains: str = "all"  # comma-separated, or "all" (every prepared domain but the held-back ones)
    init_from: str = "scratch"  # scratch | resume (continue out_dir/ckpt.pt)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast)
    compile: bool = False
    fast: bool = True  # fast.py's speed paths (False: the plain method of moa.py; the same numbers)
    batch_size: int = 16  # sequences per micro-batch (per process)
    block_size: int = 128
    grad_accum: int = 1  # micro-batches per step, counted over all processes
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
    eval_iters: int = 4  # batches per domain per evaluation
    log_interval: int = 50
    progress: bool = True  # tqdm progress bar


# ----------------------------------------------------------------------------------------------
# Data: data/prepare.py writes <data_dir>/<domain>/{train,val}.bin (uint16) and meta.json.

class DomainData:
    """Memory-mapped token streams of several domains, and balanced batches drawn from them."""

    def __init__(self, data_dir, domains="all", block_size=128):
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{meta_path} not found: run `python data/prepare.py` first")
        with open(meta_path) as f:
            self.meta = json.load(f)
        known = list(self.meta["domains"])
        if domains == "all":
            names = [d for d in known if d not in self.meta.get("held_back", [])]
        else:
            names = [d.strip() for d in domains.split(",") if d.strip()]
        for name in names:
            if name not in known:
                raise UserError(f"unknown domain {name!r}; prepared domains: {', '.join(known)}")
        if not names:
            raise UserError("no domains selected")
        self.domains, self.block_size = names, block_size
        self.tokenizer, self.vocab_size = self.meta["tokenizer"], self.meta["vocab_size"]
        self.splits = {}
        for name in names:
            for split in ("train", "val"):
                path = os.path.join(data_dir, name, f"{split}.bin")
                if not os.path.isfile(path):
                    raise UserError(f"{path} not found: run `python data/prepare.py` first")
                tokens = np.memmap(path, dtype=np.uint16, mode="r")
                if len(tokens) < block_size + 2:
                    raise UserError(f"{path} has {len(tokens)} tokens, fewer than one block of {block_size + 1}")
                self.splits[name, split] = tokens

    def windows(self, name, split, starts):
        """Token windows starting at `starts` -> x, y (len(starts), block_size) int64."""
        data, T = self.splits[name, split], self.block_size
        x = torch.from_numpy(np.stack([data[s:s + T].astype(np.int64) for s in starts]))
        y = torch.from_numpy(np.stack([data[s + 1:s + 1 + T].astype(np.int64) for s in starts]))
        return x, y

    def batch(self, batch_size, generator, split="train"):
        """A random batch with every domain equally represented -> x, y (B, T) and domain labels d (B,)."""
        K = len(self.domains)
        offset = int(torch.randint(K, (1,), generator=generator))
        d = (torch.arange(batch_size) + offset) % K  # (B,) balanced: counts differ by at most one
        xs, ys = [], []
        for label in d.tolist():
            n = len(self.splits[self.domains[label], split]) - self.block_size - 1
            x, y = self.windows(self.domains[label], split, [int(torch.randint(n, (1,), generator=generator))])
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys), d

    def eval_starts(self, name, n):
        """n fixed window starts spread evenly over a domain's validation split (no randomness)."""
        last = len(self.splits[name, "val"]) - self.block_size - 1
        return np.linspace(0, last, n).astype(np.int64).tolist()


# ----------------------------------------------------------------------------------------------
# Devices, optimizer, schedule.

def setup_device(cfg):
    """Returns (device, autocast context, ddp rank, world size); starts DDP when run under torchrun."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"--device={device}: use auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device=cuda but no CUDA GPU is available; use --device=cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in dtypes:
        raise UserError(f"--dtype={cfg.dtype}: use one of {', '.join(dtypes)}")
    rank, world = 0, 1
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    device_type = "cuda" if device.startswith("cuda") else device
    ctx = nullcontext() if cfg.dtype == "float32" else torch.autocast(device_type, dtype=dtypes[cfg.dtype])
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


# ----------------------------------------------------------------------------------------------
# The loop.

def default_loss(model, x, y, d):
    return model(x, y)[1]


def train(cfg, model, data, evaluate, loss_fn=default_loss, meta=None, lr_scales=None):
    """Trains `model`'s trainable parameters for cfg.max_iters steps; returns the per-step losses.

    evaluate(model) -> {name: float} runs at every eval_interval and at the last step; each result is
    a line of out_dir/log.jsonl and the checkpoint out_dir/ckpt.pt is rewritten after it. `meta`
    (JSON-able) is stored in the checkpoint beside the config, e.g. the model's architecture.
    lr_scales: see make_optimizer.
    """
    device, ctx, rank, world = setup_device(cfg)
    if cfg.grad_accum % world:
        raise UserError(f"grad_accum={cfg.grad_accum} must be a multiple of the {world} processes")
    master = rank == 0
    torch.manual_seed(cfg.seed)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device, lr_scales)
    batch_rng = torch.Generator().manual_seed(cfg.seed)  # the same batches on every process
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    step = 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        missing = set(trainable_state(model)) - set(ckpt["model"])
        if missing:
            raise UserError(f"{ckpt_path} does not match this model: it lacks {sorted(missing)[0]}")
        try:
            model.load_state_dict(ckpt["model"], strict=False)
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{ckpt_path} does not match this model: {str(e).splitlines()[0]}") from None
        step = ckpt["meta"]["step"]
        batch_rng.set_state(ckpt["batch_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
    elif master and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    scaler = torch.amp.GradScaler(enabled=cfg.dtype == "float16" and device.startswith("cuda"))

    def checkpoint(metrics):
        state = {"model": trainable_state(raw_model), "optimizer": optimizer.state_dict(),
                 "batch_rng": batch_rng.get_state(), "torch_rng": torch.get_rng_state(),
                 "meta": json.dumps({"step": step, "config": asdict(cfg), "metrics": metrics, **(meta or {})})}
        save_checkpoint(ckpt_path, state)

    losses, t0 = [], time.time()
    bar = None
    if master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_iters, initial=step, desc=os.path.basename(cfg.out_dir.rstrip("/")), dynamic_ncols=True)
    while True:
        last_step = step == cfg.max_iters
        if master and (step % cfg.eval_interval == 0 or last_step) and not (cfg.init_from == "resume" and not losses):
            raw_model.eval()
            with ctx:
                metrics = evaluate(raw_model)
            raw_model.train()
            record = {"step": step, "train_loss": float(np.mean(losses[-cfg.log_interval:])) if losses else None,
                      "lr": learning_rate(step, cfg), "time_s": round(time.time() - t0, 2), **metrics}
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
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y, d = data.batch(cfg.batch_size, batch_rng)
            if micro % world != rank:
                continue  # this micro-batch belongs to another process
            x, y, d = x.to(device), y.to(device), d.to(device)
            sync = micro + world >= cfg.grad_accum  # DDP: all-reduce gradients on the last micro-batch only
            with (nullcontext() if sync or world == 1 else model.no_sync()), ctx:
                loss = loss_fn(model, x, y, d) / (cfg.grad_accum // world)
            scaler.scale(loss).backward()
            total += loss.item()
        if world > 1:
            t = torch.tensor([total], device=device)
            dist.all_reduce(t)
            total = t.item() / world
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
                bar.set_postfix(loss=f"{np.mean(losses[-cfg.log_interval:]):.4f}", lr=f"{lr:.1e}")
    if bar is not None:
        bar.close()
    if world > 1:
        dist.barrier()
    return losses
