"""Stage 1 of MoA: trains LoRA experts beside the frozen base, each on its task's records.

    python train_lora.py --domain=reverse                # writes out/experts/reverse.safetensors
    python train_lora.py --domain=upper,lower,reverse    # three experts in one run, each as its own run would be
    python train_lora.py --domain=all                    # baseline: one LoRA on every task's records, pooled
    python train_lora.py --domain=all --rank=40 --name=all_r40   # ... with as many parameters as 5 experts
    python train_lora.py --domain=upper+lower            # one LoRA on two tasks: each step, the records of both
    python train_lora.py --domain=mytask --base=gpt2     # on GPT-2 weights (data prepared with --tokenizer=gpt2)
    python train_lora.py --domain=count --init_expert=out/experts/all.safetensors --name=all+count

--domain names what each LoRA learns: a task; `a+b`, one LoRA on the records of tasks a and b, each step
exactly the records the experts of a and of b draw (the transfer matrix of results.py compares them);
`all`, one LoRA on all tasks' records pooled (a task with fewer records is drawn less often). A comma
list trains several LoRAs side by side in one run (`batches.JointData`): each has its own rows in every
batch, drawn from the same seed as its own run would draw them, its own optimizer state, clipping
(trainer.Unit) and plateau (--stop_flat), so each equals the expert its own run gives (to float
rounding: tests/test_train.py), at a fraction of the time (bench.py).

Only the experts' A and B matrices train; the base's weights stay bit-identical. The loss is taken on
each record's response (`--prompt_loss` adds the prompt's tokens): the mean over a LoRA's response
tokens, so a task with longer answers weighs more in a LoRA that learns several. A LoRA trained alone is
evaluated on every task's validation records (loss per response token), so its log shows what it learns
and what it costs the other tasks; side by side, each on its own tasks. The run's checkpoint and log go
to out/experts/<name>/, each expert to out/experts/<name>.safetensors.

Read next: train_router.py (stage 2).
"""

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import fast
from batches import JointData, TaskData, by_length, check_records_fit
from config import AT_LEAST_1, FILE_NAME, FRACTION, UserError, is_name, parse_config, run
from evaluate import evaluate_tasks
from files import add_expert_file, base_files, file_shapes, fingerprint, load_base, save_expert
from moa import TARGETS, add_experts, count_params, lora_layers, noise_generators, routed, set_route
from storage import check_outputs
from trainer import TaskConfig, Unit, check_training_memory, micro_batches, pick_device, task_block_size, train

LORA_SPECS = (  # --domain: each LoRA's tasks (names, joined by +), the LoRAs separated by commas; or all
    "tasks of letters, digits, _ and -, joined by + for one LoRA, commas between LoRAs",
    lambda v: all(is_name(t) for spec in v.split(",") if spec.strip() for t in spec.strip().split("+")),
)


@dataclass
class LoRAConfig(TaskConfig):
    out_dir: str = "out/experts"
    domain: str = ""  # what each LoRA learns: a task, a+b (several tasks), all (pooled); a comma list trains several
    name: str = ""  # file name of the expert (one LoRA), or of the run's folder (several); default: from --domain
    init_expert: str = ""  # start from this expert file (its rank, alpha, targets) instead of a fresh one
    rank: int = 8  # r: each LoRA adds B (out, r) @ A (r, in) beside a linear map
    alpha: float = 16.0  # the update is scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on the LoRA's input while it trains
    targets: str = ",".join(TARGETS)  # the linear maps of each block that get a LoRA
    batch_size: int = 32  # records per step of each task a LoRA learns (all: of the pooled records)
    eval_iters: int = 4
    learning_rate: float = 3e-3  # 1e-2 learned reverse far slower (LOG.md)
    min_lr: float = 3e-4
    warmup_iters: int = 20
    weight_decay: float = 0.0

    CHECKS = {"rank": AT_LEAST_1, "lora_dropout": FRACTION, "domain": LORA_SPECS, "name": FILE_NAME}


def check_expert_memory(cfg, gpt, n_experts):
    """--rank and --batch_size, checked against the free memory before the experts are made (sizes from file_shapes,
    which allocates nothing; unknown --targets are left to add_experts to name)."""
    targets = [t for t in cfg.targets.split(",") if t in TARGETS]
    params = sum(a * b for a, b in file_shapes(gpt, {"rank": cfg.rank, "targets": targets}, "expert").values())
    check_training_memory(cfg, gpt.config, n_experts * params, ("batch_size", "rank"))


def lora_specs(cfg, data_dir):
    """--domain -> [(file name, [tasks], sampling)], one per LoRA, tasks checked against the data."""
    specs = [s.strip() for s in cfg.domain.split(",") if s.strip()]
    if not specs:
        raise UserError("say which task the expert learns: --domain=NAME (or a,b or all; a comma list for several)")
    if len(set(specs)) < len(specs):
        raise UserError(f"--domain={cfg.domain}: a LoRA is named twice")
    if len(specs) > 1 and cfg.init_expert:
        raise UserError("--init_expert continues one expert: give one --domain")
    out = []
    for spec in specs:
        if spec == "all":
            out.append((spec, TaskData(data_dir).domains, "pooled"))
        else:
            tasks = spec.split("+")
            TaskData(data_dir, ",".join(tasks))  # unknown tasks: an error naming them
            out.append((spec, tasks, "balanced"))
    if cfg.name and len(out) == 1:
        out[0] = (cfg.name, *out[0][1:])
    return out


def unit_data(cfg, tasks, sampling, block_size):
    """What one LoRA trains on: `all` as one pooled TaskData; else one TaskData per task, side by side."""
    if sampling == "pooled":
        return [TaskData(cfg.data_dir, ",".join(tasks), block_size, cfg.prompt_loss, "pooled")]
    return [TaskData(cfg.data_dir, t, block_size, cfg.prompt_loss) for t in tasks]


def main(argv=None):
    cfg = parse_config(LoRAConfig, argv or [])
    if not cfg.domain:
        raise UserError("say which task the expert learns: --domain=NAME (or a,b or all; a comma list for several)")
    pick_device(cfg.device, cfg.dtype)  # a device that is not here: said before anything is read
    specs = lora_specs(cfg, cfg.data_dir)
    names = [name for name, _, _ in specs]
    run_dir = os.path.join(cfg.out_dir, names[0] if len(specs) == 1 else cfg.name or "_".join(names))
    paths = [os.path.join(cfg.out_dir, f"{name}.safetensors") for name in names]
    check_outputs(
        paths + [os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "log.jsonl")],
        base_files(cfg.base) + ([cfg.init_expert] if cfg.init_expert else []),
    )
    model, tokenizer = load_base(cfg.base)
    block_size = task_block_size(cfg, model)
    parts = [unit_data(cfg, tasks, sampling, block_size) for _, tasks, sampling in specs]
    for data in {id(d): d for datas in parts for d in datas}.values():
        check_records_fit(data)
    if tokenizer != parts[0][0].tokenizer:
        raise UserError(
            f"the base uses tokenizer {tokenizer!r} but {cfg.data_dir} was prepared with "
            f"{parts[0][0].tokenizer!r}; prepare the data with --tokenizer={tokenizer}"
        )
    base = fingerprint(model)
    cfg, before = add_loras(cfg, model, specs, tokenizer)
    experts = Experts(cfg, model, specs, block_size, tokenizer, base, before)
    meta = {"kind": "expert", "domain": cfg.domain, "base": base["sha256"]}
    losses = train(
        replace(cfg, out_dir=run_dir),
        model,
        JointData(parts),
        experts.evaluate,
        experts.loss,
        meta,
        finish=lambda m, steps: [experts.save(m, k, path, steps[names[k]]) for k, path in enumerate(paths)],
        units=experts.units(),
        snapshot=experts.snapshot,
    )
    return model, losses


def add_loras(cfg, model, specs, tokenizer):
    """The LoRAs beside the frozen base, each started as its own run would start it -> (cfg, the training records
    the LoRA has seen before this run): --init_expert goes on from that expert, with its rank, alpha and targets."""
    before = 0
    if cfg.init_expert:  # go on training an existing expert, with its rank, alpha and targets
        meta = add_expert_file(model, cfg.init_expert, tokenizer, cfg.lora_dropout)
        cfg = replace(cfg, rank=meta["rank"], alpha=meta["alpha"], targets=",".join(meta["targets"]))
        before = meta.get("samples", 0)
    else:
        check_expert_memory(cfg, model, len(specs))
        add_experts(model, 0, cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.targets.split(","))
        for _ in specs:
            torch.manual_seed(cfg.seed)  # each LoRA's initial A is part of its run: the same as its own run's
            for layer in lora_layers(model):
                layer.add_expert()
    if len(specs) == 1:
        set_route(model, 0)  # a base with one expert: every call goes through it (see files.add_expert_file)
    fast.enable(model, cfg.fast)
    trainable, total = count_params(model)
    print(
        f"{len(specs)} LoRA(s) on the frozen base: {', '.join(n for n, _, _ in specs)}; {trainable:,} trainable "
        f"parameters, {100 * trainable / len(specs) / (total - trainable):.2f}% of the base each"
    )
    return cfg, before


class Experts:
    """The LoRAs of one run and what the loop asks of them: the loss of a batch, the evaluation, the files."""

    def __init__(self, cfg, model, specs, block_size, tokenizer, base, before=0):
        self.cfg, self.specs, self.tokenizer, self.base, self.before = cfg, specs, tokenizer, base, before
        self.layers = lora_layers(model)
        # Alone, a LoRA is measured on every task (what it learns and what it costs the others); side by side,
        # each on its own tasks only (every LoRA on every task would cost as much as the training).
        every = TaskData(cfg.data_dir, cfg.domains, block_size).domains if len(specs) == 1 else []
        self.evals = [
            TaskData(cfg.data_dir, ",".join(every + [t for t in tasks if t not in every]), block_size)
            for _, tasks, _ in specs
        ]

    def units(self):
        """One trainer.Unit per LoRA: its A and B matrices, clipped and stopped on their own."""
        return [
            Unit(name, {name: [p for layer in self.layers for p in (layer.lora_A[k], layer.lora_B[k])]})
            for k, (name, _, _) in enumerate(self.specs)
        ]

    def loss(self, m, batch):
        """Each LoRA's mean loss over its response tokens, summed over the LoRAs: each gets its own run's gradient."""
        total = 0.0
        for k in batch.run.unique().tolist():  # each LoRA's rows through it alone: the one-expert path
            rows = batch.rows(torch.nonzero(batch.run == k)[:, 0])
            counted = (rows.y != -1).sum().clamp(min=1)
            for part in by_length(rows):  # rows of similar length together: little padding
                with routed(self.layers, k, noise_generators(part)):
                    logits, _ = m(part.x)  # (n, T, V)
                nll = F.cross_entropy(logits.float().transpose(1, 2), part.y, ignore_index=-1, reduction="sum")
                total = total + nll / counted
        return total

    def evaluate(self, m):
        """Each LoRA's validation losses; its plateau watches the mean over its own tasks."""
        out, n = {}, self.cfg.eval_iters * self.cfg.batch_size
        for k, (name, tasks, _) in enumerate(self.specs):
            with routed(self.layers, k):
                scores = evaluate_tasks(m, self.evals[k], n, self.cfg.batch_size, generate=False, served=False)
            tag = "" if len(self.specs) == 1 else f"@{name}"
            out.update({f"{key}{tag}": v for key, v in scores.items() if key.startswith("loss/")})
            out[f"watch/{name}"] = sum(scores[f"loss/{t}"] for t in tasks) / len(tasks)
        return out

    def save(self, m, k, path, steps):
        """LoRA k after `steps` steps of this run as an expert file, with the training records it saw in all (with
        --init_expert, also those of the runs before)."""
        _, tasks, sampling = self.specs[k]
        per_step = self.cfg.batch_size * micro_batches(self.cfg) * (1 if sampling == "pooled" else len(tasks))
        extra = {"trained_on": tasks, "samples": self.before + steps * per_step, "steps": steps}
        domain = tasks[0] if len(tasks) == 1 else "all" if sampling == "pooled" else "mixed"
        save_expert(path, m, k, domain, self.tokenizer, self.base, extra)
        print(f"saved {path} ({os.path.getsize(path) / 1e3:.0f} kB, {steps} steps)")

    def snapshot(self, m, step, active):
        """--save_at: the LoRAs still training, as <name>@<step>.safetensors."""
        for k, (name, _, _) in enumerate(self.specs):
            if active[k]:
                self.save(m, k, os.path.join(self.cfg.out_dir, f"{name}@{step}.safetensors"), step)


if __name__ == "__main__":
    run(main)
