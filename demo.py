"""The whole of nanoMoA in one command: data, base, experts, routers, baselines, the results, examples.

    python demo.py              # everything once, on 2 CPU cores in about 15 minutes, into out/
    python demo.py --seeds=3    # everything after the base for seeds 1, 2, 3: the README's tables
    python demo.py --quick      # a first look in a few minutes, into out/quick/ (numbers not meaningful)

Each step calls the `main` of the script a user would run by hand (shown as it starts), and is skipped
when its output already exists, so an interrupted demo goes on where it stopped. The base is trained
once (out/base); each seed's experts and bundles go to out/runs/seed<N>/. Every baseline trains on as
many records in all as MoA does: K stage-1 experts of S1 steps plus S2 steps of stage 2, at the same
batch size.

Read next: bench.py.
"""

import os
import time
from dataclasses import dataclass

import torch

import data.prepare
import fast
import results
import train_base
import train_lora
import train_router
from config import AT_LEAST_1, parse_config, run
from evaluate import answers, rouge_l
from files import add_expert_file, load_base, load_bundle
from tokenizer import encode, get_tokenizer
from trainer import TaskData, pick_device


@dataclass
class DemoConfig:
    quick: bool = False  # a first look in a few minutes, into out/quick (numbers not meaningful)
    seeds: int = 1  # runs after the base, with seeds 1..seeds
    data_dir: str = "data/default"
    out: str = "out"
    base_iters: int = 1200
    stage1_iters: int = 300  # per expert
    stage2_iters: int = 300
    device: str = "auto"  # every step's: auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps

    CHECKS = {"seeds": AT_LEAST_1, "base_iters": AT_LEAST_1, "stage1_iters": AT_LEAST_1, "stage2_iters": AT_LEAST_1}


def step(title, output, script, args):
    """Runs script.main(args) unless `output` exists; prints the equivalent command first."""
    if output and os.path.exists(output):
        print(f"[skip] {title}: {output} exists")
        return
    name = script.__name__.replace(".", "/") + ".py"
    print(f"\n[{title}] python {name} {' '.join(args)}", flush=True)
    t0 = time.time()
    script.main(args)
    print(f"[{title}] done in {time.time() - t0:.0f}s", flush=True)


def seed_run(cfg, out, seed, tasks, added):
    """Stage 1, stage 2, the baselines and the adding-a-task experiment, for one seed."""
    K, S1, S2 = len(tasks), cfg.stage1_iters, cfg.stage2_iters
    run_dir = f"{out}/runs/seed{seed}"
    experts, bundles = f"{run_dir}/experts", f"{run_dir}/moa"
    common = [f"--data_dir={cfg.data_dir}", f"--base={out}/base", f"--seed={seed}", f"--device={cfg.device}"]
    lora = common + [f"--out_dir={experts}", f"--max_iters={S1}"]
    router = common + [f"--experts={experts}", f"--out_dir={bundles}", f"--max_iters={S2}"]
    same_compute = f"--max_iters={K * S1 + S2}"  # as many training records as MoA saw in both stages
    for task in tasks:
        step(f"stage 1: {task} expert", f"{experts}/{task}.safetensors", train_lora, lora + [f"--domain={task}"])
    step("stage 2: MoA (joint)", f"{bundles}/moa.safetensors", train_router, router)
    if cfg.quick:
        return
    step(
        "baseline: one LoRA on every task",
        f"{experts}/all.safetensors",
        train_lora,
        lora + ["--domain=all", same_compute, f"--eval_interval={S1}"],
    )
    step(
        f"baseline: one LoRA, rank {8 * K}",
        f"{experts}/all_r{K}.safetensors",
        train_lora,  # alpha stays 16:
        lora + ["--domain=all", same_compute, f"--eval_interval={S1}", f"--rank={8 * K}", f"--name=all_r{K}"],
    )
    step(
        "MoA, routers only",
        f"{bundles}/moa_routers.safetensors",
        train_router,
        router + ["--train_experts=False", "--name=moa_routers"],
    )
    step(
        "ablation: MoE-LoRA",
        f"{bundles}/moe_lora.safetensors",
        train_router,
        router + ["--mode=token", "--eta=0", "--name=moe_lora"],
    )
    step(
        "ablation: MoE-LoRA naive",
        f"{bundles}/moe_lora_naive.safetensors",
        train_router,
        router + ["--mode=token", "--eta=0", "--expert_init=random", "--name=moe_lora_naive", same_compute],
    )
    if added is None:  # no held-back task in the data
        return
    step(
        f"adding a task: the {added} expert", f"{experts}/{added}.safetensors", train_lora, lora + [f"--domain={added}"]
    )
    step(
        f"adding a task: MoA + {added}",
        f"{bundles}/moa+{added}.safetensors",
        train_router,
        router + [f"--add_domain={added}", f"--bundle={bundles}/moa.safetensors"],
    )
    step(
        "adding a task, every router row retrained",
        f"{bundles}/moa+{added}_allrows.safetensors",
        train_router,
        router
        + [
            f"--add_domain={added}",
            f"--bundle={bundles}/moa.safetensors",
            "--train_old_rows=True",
            f"--name=moa+{added}_allrows",
        ],
    )
    step(
        f"alternative: the mixed LoRA trained on {added}",
        f"{experts}/all+{added}.safetensors",
        train_lora,
        lora + [f"--domain={added}", f"--init_expert={experts}/all.safetensors", f"--name=all+{added}"],
    )
    step(
        f"alternative: MoA retrained on {K + 1} tasks",
        f"{bundles}/moa_all.safetensors",
        train_router,
        router + [f"--domains={','.join(tasks + [added])}", "--name=moa_all"],
    )


@torch.no_grad()
def examples(cfg, out, tasks, per_task=2):
    """The last step: prompts of every task in one batch, routed by MoA (with the last router's calibrated
    confidence) and answered, beside the same prompts through the mixed LoRA; exact answers marked right (+)
    or wrong (-)."""
    run_dir = f"{out}/runs/seed1"
    gpt, tokenizer = load_base(f"{out}/base")
    moa = fast.enable(load_bundle(f"{run_dir}/moa/moa.safetensors", gpt.to(cfg.device), tokenizer)[0]).eval()
    mixed_path = f"{run_dir}/experts/all.safetensors"
    mixed = None
    if os.path.isfile(mixed_path):
        mixed = load_base(f"{out}/base")[0].to(cfg.device)
        add_expert_file(mixed, mixed_path, tokenizer)
        mixed = fast.enable(mixed).eval()
    enc, data = get_tokenizer(tokenizer), TaskData(cfg.data_dir, ",".join(tasks))
    rows = []  # (task, prompt tokens, answer text, hand-written?)
    for name in tasks:
        rows += [
            (name, p, enc.decode(r[:-1]), False) for p, r in (data.record(name, "val", i) for i in range(per_task))
        ]
        rows += [(name, encode(enc, p), a, True) for p, a in results.HAND_WRITTEN.get(name, [])[:1]]
    prompts = [p for _, p, _, _ in rows]
    longest = max(len(encode(enc, a)) for _, _, a, _ in rows) + 1
    routed = answers(moa, prompts, longest, data.eot, mode="last")
    decision, confidence = moa.routing["decision"].tolist(), moa.routing["confidence"].tolist()
    plain = answers(mixed, prompts, longest, data.eot) if mixed else [None] * len(rows)
    print(
        "\n[examples] MoA (mode last) against one LoRA on every task: validation prompts, and one hand-written "
        "prompt per task (marked *)"
    )
    for (task, prompt, answer, hand), got, other, k, p in zip(rows, routed, plain, decision, confidence):
        mark = lambda text, answer=answer: f"{'+' if text == answer else '-'} {text!r}"  # noqa: E731
        print(f"{'*' if hand else ' '} {task:>8} | {enc.decode(prompt)!r}")
        print(
            f"           -> expert {moa.domains[k]} ({p:.2f}): {mark(enc.decode(got))}"
            + (f"   mixed LoRA: {mark(enc.decode(other))}" if other is not None else "")
            + f"   (answer {answer!r}, ROUGE-L {rouge_l(enc.decode(got), answer):.2f})"
        )


def main(argv=None):
    cfg = parse_config(DemoConfig, argv or [])
    cfg.device = pick_device(cfg.device)[0]  # auto -> the device; one that is not here: an error now
    out = f"{cfg.out}/quick" if cfg.quick else cfg.out
    if cfg.quick:
        cfg.base_iters, cfg.stage1_iters, cfg.stage2_iters = 200, 60, 60
    t0 = time.time()
    step("data", f"{cfg.data_dir}/meta.json", data.prepare, [f"--out_dir={cfg.data_dir}"])
    meta = TaskData(cfg.data_dir).meta
    tasks, added = [t for t in meta["tasks"] if t not in meta["held_back"]], (meta["held_back"] or [None])[0]
    step(
        "base",
        f"{out}/base/ckpt.pt",
        train_base,
        [
            f"--data_dir={cfg.data_dir}",
            f"--out_dir={out}/base",
            f"--max_iters={cfg.base_iters}",
            f"--device={cfg.device}",
        ],
    )
    for seed in range(1, cfg.seeds + 1):
        seed_run(cfg, out, seed, tasks, added)
    step(
        "results",
        None,
        results,
        [f"--out={out}", f"--data_dir={cfg.data_dir}", f"--device={cfg.device}"]
        + (["--records=32", "--plots=False"] if cfg.quick else []),
    )
    examples(cfg, out, tasks)
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min; the tables are in {out}/results/results.md")


if __name__ == "__main__":
    run(main)
