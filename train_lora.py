"""Stage 1 of MoA: trains one domain's LoRA expert beside the frozen base, on that task's records.

    python train_lora.py --domain=reverse                # writes out/experts/reverse.safetensors
    python train_lora.py --domain=all                    # baseline: one LoRA on every task, balanced
    python train_lora.py --domain=all --rank=32 --name=all_r32   # ... with as many parameters as 4 experts
    python train_lora.py --domain=mytask --base=gpt2     # on GPT-2 weights (data prepared with --tokenizer=gpt2)
    python train_lora.py --domain=upper --init_expert=out/experts/all.safetensors --name=all+upper

Only the expert's A and B matrices train; the base's weights stay bit-identical. The loss is taken on
each record's response (`--prompt_loss` adds the prompt's tokens). The expert is evaluated on every
task's validation records (loss per response token), so a log shows what it learns and what it costs
the other tasks. The run's checkpoint and log go to out/experts/<name>/, the expert itself to
out/experts/<name>.safetensors.

Read next: train_router.py (stage 2).
"""

import os
from dataclasses import dataclass, replace

import torch

import fast
from config import A_NAME, AT_LEAST_1, FILE_NAME, FRACTION, UserError, parse_config, run
from evaluate import evaluate_tasks
from files import add_expert_file, base_files, check_outputs, file_shapes, fingerprint, load_base, save_expert
from moa import TARGETS, add_experts, count_params, set_route
from trainer import (
    TaskConfig,
    TaskData,
    check_records_fit,
    check_training_memory,
    micro_batches,
    task_block_size,
    train,
)


@dataclass
class LoRAConfig(TaskConfig):
    out_dir: str = "out/experts"
    domain: str = ""  # the task this expert learns, or "all" for one LoRA on every task
    name: str = ""  # file name of the expert; default: the domain
    init_expert: str = ""  # start from this expert file (its rank, alpha, targets) instead of a fresh one
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    targets: str = ",".join(TARGETS)
    batch_size: int = 32
    max_iters: int = 300
    eval_interval: int = 100
    eval_iters: int = 2
    learning_rate: float = 1e-2
    min_lr: float = 1e-3
    warmup_iters: int = 20
    weight_decay: float = 0.0

    CHECKS = {"rank": AT_LEAST_1, "lora_dropout": FRACTION, "domain": A_NAME, "name": FILE_NAME}


def check_expert_memory(cfg, gpt):
    """--rank and --batch_size, checked against the free memory before the expert is made (sizes from file_shapes,
    which allocates nothing; unknown --targets are left to add_experts to name)."""
    targets = [t for t in cfg.targets.split(",") if t in TARGETS]
    params = sum(a * b for a, b in file_shapes(gpt, {"rank": cfg.rank, "targets": targets}, "expert").values())
    check_training_memory(cfg, gpt.config, params, ("batch_size", "rank"))


def main(argv=None):
    cfg = parse_config(LoRAConfig, argv or [])
    if not cfg.domain:
        raise UserError("say which task the expert learns: --domain=NAME (or --domain=all)")
    name = cfg.name or cfg.domain
    path, run_dir = os.path.join(cfg.out_dir, f"{name}.safetensors"), os.path.join(cfg.out_dir, name)
    check_outputs(
        [path, os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "log.jsonl")],
        base_files(cfg.base) + ([cfg.init_expert] if cfg.init_expert else []),
    )
    model, tokenizer = load_base(cfg.base)
    block_size = task_block_size(cfg, model)
    train_data = TaskData(cfg.data_dir, "all" if cfg.domain == "all" else cfg.domain, block_size, cfg.prompt_loss)
    check_records_fit(train_data)
    eval_data = TaskData(cfg.data_dir, cfg.domains, block_size)  # the expert is measured on every task
    if cfg.domain != "all" and cfg.domain not in eval_data.domains:  # e.g. the held-back task
        eval_data = TaskData(cfg.data_dir, ",".join(eval_data.domains + [cfg.domain]), block_size)
    if tokenizer != train_data.tokenizer:
        raise UserError(
            f"the base uses tokenizer {tokenizer!r} but {cfg.data_dir} was prepared with "
            f"{train_data.tokenizer!r}; prepare the data with --tokenizer={tokenizer}"
        )
    torch.manual_seed(cfg.seed)  # the expert's initial A is part of the run
    base = fingerprint(model)
    if cfg.init_expert:  # go on training an existing expert, with its rank, alpha and targets
        meta = add_expert_file(model, cfg.init_expert, tokenizer, cfg.lora_dropout)
        cfg = replace(cfg, rank=meta["rank"], alpha=meta["alpha"], targets=",".join(meta["targets"]))
    else:
        check_expert_memory(cfg, model)
        add_experts(model, 1, cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.targets.split(","))
        set_route(model, 0)  # every sample uses the one expert
    fast.enable(model, cfg.fast)
    trainable, total = count_params(model)
    print(
        f"expert {name!r} on {', '.join(train_data.domains)}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / (total - trainable):.2f}% of the base)"
    )

    def evaluate(m):
        return evaluate_tasks(
            m, eval_data, cfg.eval_iters * cfg.batch_size, cfg.batch_size, generate=False, served=False
        )

    samples = cfg.max_iters * cfg.batch_size * micro_batches(cfg)  # training records seen, for fair comparisons

    def finish(m):  # once training is over (under torchrun: on process 0 only)
        save_expert(path, m, 0, cfg.domain, tokenizer, base, {"trained_on": train_data.domains, "samples": samples})
        print(f"saved {path} ({os.path.getsize(path) / 1e3:.0f} kB)")

    losses = train(
        replace(cfg, out_dir=run_dir),
        model,
        train_data,
        evaluate,
        meta={"kind": "expert", "domain": cfg.domain, "base": base["sha256"]},
        finish=finish,
    )
    return model, losses


if __name__ == "__main__":
    run(main)
