"""The whole of nanoMoA in one command: data, base, experts, routers, baselines, the results, examples.

    python demo.py              # everything once, on 2 CPU cores in about 15 minutes, into out/
    python demo.py --seeds=3    # everything after the base for seeds 1, 2, 3: the README's tables
    python demo.py --quick      # a first look in a few minutes, into out/quick/ (numbers not meaningful)

Each step runs the script a user would run by hand (the command is shown as it starts), and is skipped
when its output already exists, so an interrupted demo goes on where it stopped. The base is trained
once (out/base); each seed's experts and bundles go to out/runs/seed<N>/. Every baseline trains on as
many records in all as MoA does: K stage-1 experts of S1 steps plus S2 steps of stage 2, at the same
batch size. On a CPU, steps that do not wait for each other run side by side, one process per core on
one thread each (--jobs), their output in out/logs/: at nanoMoA's sizes two one-thread processes do
twice one thread's work where one two-thread process does 1.6-1.75 times it (scripts/threads.py), and
they do not collapse when another job shares the cores.

Read next: bench.py.
"""

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

import data.prepare
import fast
import results
import train_base
import train_lora
import train_router
from config import AT_LEAST_0, AT_LEAST_1, UserError, parse_config, run
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
    jobs: int = 0  # steps at once, each a process on one thread; 0: one per CPU core on a CPU, 1 on a GPU

    CHECKS = {
        "seeds": AT_LEAST_1,
        "base_iters": AT_LEAST_1,
        "stage1_iters": AT_LEAST_1,
        "stage2_iters": AT_LEAST_1,
        "jobs": AT_LEAST_0,
    }


@dataclass
class Step:
    title: str
    output: str  # the file the step writes last; the step is skipped when it exists
    script: object  # the module whose file runs, with args
    args: list
    needs: list = field(default_factory=list)  # files that must exist before it starts (other steps' outputs)

    def command(self):
        return ["python", os.path.relpath(self.script.__file__), *self.args]


def run_steps(steps, jobs, log_dir):
    """Runs the steps whose output does not exist yet, each as `python script args` in a process of its own,
    up to `jobs` at once and each once the files it needs exist. With more than one at a time each runs on
    one thread with its output in log_dir/<title>.log; alone, it prints as it goes. A failed step stops the
    others and ends the demo with a one-line error naming its log."""
    todo = []
    for s in steps:
        if os.path.exists(s.output):
            print(f"[skip] {s.title}: {s.output} exists")
        else:
            todo.append(s)
    running = {}  # process -> (step, start time, log file or None)
    try:
        while todo or running:
            ready = [s for s in todo if all(os.path.exists(n) for n in s.needs)]
            if not ready and not running:
                missing = sorted({n for s in todo for n in s.needs if not os.path.exists(n)})
                raise UserError(f"no step can start: missing {', '.join(missing)}")
            while ready and len(running) < jobs:
                s = ready.pop(0)
                todo.remove(s)
                alone = jobs == 1
                print(f"\n[{s.title}] {' '.join(s.command())}", flush=True)
                log = None
                if not alone:
                    os.makedirs(log_dir, exist_ok=True)
                    log = open(os.path.join(log_dir, re.sub(r"[^\w+.-]+", "_", s.title) + ".log"), "w")
                env = os.environ if alone else {**os.environ, "OMP_NUM_THREADS": "1"}
                cmd = [sys.executable, *s.command()[1:]]
                running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log else None, env=env)] = (
                    s,
                    time.time(),
                    log,
                )
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                s, t0, log = running.pop(proc)
                if log:
                    log.close()
                if proc.returncode != 0:
                    where = f"; its output: {log.name}" if log else ""
                    raise UserError(f"step '{s.title}' failed (exit status {proc.returncode}){where}")
                print(f"[{s.title}] done in {time.time() - t0:.0f}s", flush=True)
    finally:
        for proc, (_, _, log) in running.items():  # on a failure or Ctrl-C: stop the others too
            proc.kill()
            proc.wait()
            if log:
                log.close()


def seed_steps(cfg, out, seed, tasks, added):
    """Stage 1, stage 2, the baselines and the adding-a-task experiment for one seed, each with what it needs."""
    K, S1, S2 = len(tasks), cfg.stage1_iters, cfg.stage2_iters
    run_dir = f"{out}/runs/seed{seed}"
    experts, bundles = f"{run_dir}/experts", f"{run_dir}/moa"
    common = [f"--data_dir={cfg.data_dir}", f"--base={out}/base", f"--seed={seed}", f"--device={cfg.device}"]
    same_compute = f"--max_iters={K * S1 + S2}"  # as many training records as MoA saw in both stages
    lora_dir, router_dir = common + [f"--out_dir={experts}"], common + [f"--experts={experts}", f"--out_dir={bundles}"]
    lora, router = lora_dir + [f"--max_iters={S1}"], router_dir + [f"--max_iters={S2}"]
    stage1 = [f"{experts}/{task}.safetensors" for task in tasks]
    moa, mixed = f"{bundles}/moa.safetensors", f"{experts}/all.safetensors"
    steps = [
        Step(f"seed {seed}, stage 1: {t} expert", e, train_lora, lora + [f"--domain={t}"])
        for t, e in zip(tasks, stage1)
    ]
    steps.append(Step(f"seed {seed}, stage 2: MoA (joint)", moa, train_router, router, stage1))
    if cfg.quick:
        return steps
    steps[:0] = [  # the longest step first: it needs only the base
        Step(
            f"seed {seed}, ablation: MoE-LoRA naive",
            f"{bundles}/moe_lora_naive.safetensors",
            train_router,
            router_dir + [same_compute, "--mode=token", "--eta=0", "--expert_init=random", "--name=moe_lora_naive"],
        ),
    ]
    steps += [
        Step(
            f"seed {seed}, baseline: one LoRA on every task",
            mixed,
            train_lora,
            lora_dir + [same_compute, "--domain=all", f"--eval_interval={S1}"],
        ),
        Step(
            f"seed {seed}, baseline: one LoRA, rank {8 * K}",
            f"{experts}/all_r{K}.safetensors",
            train_lora,
            lora_dir + [same_compute, "--domain=all", f"--eval_interval={S1}", f"--rank={8 * K}", f"--name=all_r{K}"],
        ),
        Step(
            f"seed {seed}, MoA, routers only",
            f"{bundles}/moa_routers.safetensors",
            train_router,
            router + ["--train_experts=False", "--name=moa_routers"],
            stage1,
        ),
        Step(
            f"seed {seed}, ablation: MoE-LoRA",
            f"{bundles}/moe_lora.safetensors",
            train_router,
            router + ["--mode=token", "--eta=0", "--name=moe_lora"],
            stage1,
        ),
    ]
    if added is None:  # no held-back task in the data
        return steps
    new_expert = f"{experts}/{added}.safetensors"
    steps += [
        Step(f"seed {seed}, adding a task: the {added} expert", new_expert, train_lora, lora + [f"--domain={added}"]),
        Step(
            f"seed {seed}, adding a task: MoA + {added}",
            f"{bundles}/moa+{added}.safetensors",
            train_router,
            router + [f"--add_domain={added}", f"--bundle={moa}"],
            [moa, new_expert],
        ),
        Step(
            f"seed {seed}, adding a task, every router row retrained",
            f"{bundles}/moa+{added}_allrows.safetensors",
            train_router,
            router
            + [f"--add_domain={added}", f"--bundle={moa}", "--train_old_rows=True", f"--name=moa+{added}_allrows"],
            [moa, new_expert],
        ),
        Step(
            f"seed {seed}, alternative: the mixed LoRA trained on {added}",
            f"{experts}/all+{added}.safetensors",
            train_lora,
            lora + [f"--domain={added}", f"--init_expert={mixed}", f"--name=all+{added}"],
            [mixed],
        ),
        Step(
            f"seed {seed}, alternative: MoA retrained on {K + 1} tasks",
            f"{bundles}/moa_all.safetensors",
            train_router,
            router + [f"--domains={','.join(tasks + [added])}", "--name=moa_all"],
            stage1 + [new_expert],
        ),
    ]
    return steps


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
    if cfg.jobs == 0:
        cfg.jobs = (os.cpu_count() or 1) if cfg.device == "cpu" else 1
    t0 = time.time()
    run_steps([Step("data", f"{cfg.data_dir}/meta.json", data.prepare, [f"--out_dir={cfg.data_dir}"])], 1, None)
    meta = TaskData(cfg.data_dir).meta
    tasks, added = [t for t in meta["tasks"] if t not in meta["held_back"]], (meta["held_back"] or [None])[0]
    base_args = [f"--data_dir={cfg.data_dir}", f"--out_dir={out}/base", f"--max_iters={cfg.base_iters}"]
    run_steps([Step("base", f"{out}/base/ckpt.pt", train_base, base_args + [f"--device={cfg.device}"])], 1, None)
    steps = [s for seed in range(1, cfg.seeds + 1) for s in seed_steps(cfg, out, seed, tasks, added)]
    run_steps(steps, cfg.jobs, f"{out}/logs")
    print("\n[results] python results.py", flush=True)
    results.main(
        [f"--out={out}", f"--data_dir={cfg.data_dir}", f"--device={cfg.device}"]
        + (["--records=32", "--plots=False"] if cfg.quick else [])
    )
    examples(cfg, out, tasks)
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min; the tables are in {out}/results/results.md")


if __name__ == "__main__":
    run(main)
