"""The whole of nanoMoA in one command: data, base, experts, routers, baselines, the results, examples.

    python demo.py              # the demo: one seed, every main row, on 2 CPU cores in about 15 minutes
    python demo.py --full       # the study behind the README: 3 seeds, the budget sweep, the transfer matrix,
                                # the imbalanced variant and the base without skills (see --help for its time)
    python demo.py --quick      # a first look in a few minutes, into out/quick/ (numbers not meaningful)

Each step runs the script a user would run by hand (the command is shown as it starts), and is skipped
when its output already exists, so an interrupted run goes on where it stopped. The base is trained
once (out/base); each seed's experts and bundles go to out/runs/seed<N>/. One progress bar counts the
training records still to go, with an estimate of the time left; the end prints where the time went.

Every model is trained to its plateau (--stop_flat, the same rule for all, with --cap steps at most),
and also saved on the way at the steps the budget comparisons need (--save_at): for each budget b of
--budgets, MoA's experts after b steps each plus b steps of stage 2, against the baselines after as
many training records ((K + 1) b steps) and after as many optimizer updates (2 b steps). Every task
stage runs at a constant learning rate after warmup, so a model saved at step s is exactly the model
a run of s steps gives.

On a CPU, steps that do not wait for each other run side by side, one process per core on one thread
each (--jobs), their output in out/logs/: at nanoMoA's sizes two one-thread processes do twice one
thread's work where one two-thread process does 1.6-1.75 times it (scripts/threads.py), and they do
not collapse when another job shares the cores.

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
from batches import TaskData
from config import AT_LEAST_0, AT_LEAST_1, FRACTION, UserError, parse_config, run
from data.tasks import HAND_WRITTEN
from evaluate import answers, rouge_l
from files import add_expert_file, load_base, load_bundle
from tokenizer import encode, get_tokenizer
from trainer import pick_device


@dataclass
class DemoConfig:
    full: bool = False  # the whole study: 3 seeds, budget sweep, transfer matrix, imbalanced data, plain base
    quick: bool = False  # a first look in a few minutes, into out/quick (numbers not meaningful)
    seeds: int = 0  # runs after the base, with seeds 1..seeds (0: 1, or 3 with --full)
    data_dir: str = "data/default"
    out: str = "out"
    base_iters: int = 1200
    cap: int = 1000  # the most steps any run may take to reach its plateau
    stop_flat: float = 0.02  # the plateau rule (trainer.flat): less than 2% better over the last 20% of steps
    budgets: str = "100"  # stage-1 steps per expert at each budget point (--full: 50,100,150)
    pair_steps: int = 150  # steps of each LoRA of the transfer matrix (--full)
    add_iters: int = 300  # steps of the new router row when a task is added
    device: str = "auto"  # every step's: auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    jobs: int = 0  # steps at once, each a process on one thread; 0: one per CPU core on a CPU, 1 on a GPU

    CHECKS = {
        "seeds": AT_LEAST_0,
        "base_iters": AT_LEAST_1,
        "cap": AT_LEAST_1,
        "stop_flat": FRACTION,
        "pair_steps": AT_LEAST_1,
        "add_iters": AT_LEAST_1,
        "jobs": AT_LEAST_0,
    }


@dataclass
class Step:
    title: str
    output: str  # the file the step writes last; the step is skipped when it exists
    script: object  # the module whose file runs, with args
    args: list
    needs: list = field(default_factory=list)  # files that must exist before it starts (other steps' outputs)
    cost: float = 1.0  # training records it will see, about: what the progress bar and its estimate count

    def command(self):
        return ["python", os.path.relpath(self.script.__file__), *self.args]


def run_steps(steps, jobs, log_dir):
    """Runs the steps whose output does not exist yet, each as `python script args` in a process of its own,
    up to `jobs` at once and each once the files it needs exist. With more than one at a time each runs on
    one thread with its output in log_dir/<title>.log; alone, it prints as it goes. A failed step stops the
    others and ends the run with a one-line error naming its log. Returns {title: seconds} of the steps run."""
    todo = []
    for s in steps:
        if os.path.exists(s.output):
            print(f"[skip] {s.title}: {s.output} exists")
        else:
            todo.append(s)
    progress = Progress(sum(s.cost for s in todo))
    running, took = {}, {}  # process -> (step, start time, log file or None); title -> seconds
    try:
        while todo or running:
            ready = [s for s in todo if all(os.path.exists(n) for n in s.needs)]
            if not ready and not running:
                missing = sorted({n for s in todo for n in s.needs if not os.path.exists(n)})
                raise UserError(f"no step can start: missing {', '.join(missing)}")
            while ready and len(running) < jobs:
                s = ready.pop(0)
                todo.remove(s)
                running[start(s, jobs, log_dir)] = (s, time.time())
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                s, t0 = running.pop(proc)
                if proc.log:
                    proc.log.close()
                if proc.returncode != 0:
                    where = f"; its output: {proc.log.name}" if proc.log else ""
                    raise UserError(f"step '{s.title}' failed (exit status {proc.returncode}){where}")
                took[s.title] = time.time() - t0
                progress.done(s, took[s.title])
    finally:
        for proc in running:  # on a failure or Ctrl-C: stop the others too
            proc.kill()
            proc.wait()
            if proc.log:
                proc.log.close()
    return took


def start(s, jobs, log_dir):
    """Starts one step's process: alone with the caller's threads and output, or on one thread into its log."""
    alone = jobs == 1
    print(f"\n[{s.title}] {' '.join(s.command())}", flush=True)
    log = None
    if not alone:
        os.makedirs(log_dir, exist_ok=True)
        log = open(os.path.join(log_dir, re.sub(r"[^\w+.-]+", "_", s.title) + ".log"), "w")
    env = os.environ if alone else {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *s.command()[1:]]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log else None, env=env)
    proc.log = log
    return proc


class Progress:
    """The share of the work done (by the steps' costs) and the time left at the pace so far."""

    def __init__(self, total):
        self.total, self.finished, self.t0 = total, 0.0, time.time()

    def done(self, step, seconds):
        self.finished += step.cost
        share = self.finished / max(self.total, 1e-9)
        elapsed = time.time() - self.t0
        left = elapsed * (1 - share) / max(share, 1e-9)
        print(
            f"[{step.title}] done in {seconds:.0f}s | {100 * share:.0f}% of the work, "
            f"{elapsed / 60:.1f} min so far, about {left / 60:.0f} min left",
            flush=True,
        )


def budgets(cfg):
    text = cfg.budgets if not cfg.full or cfg.budgets != DemoConfig.budgets else "50,100,150"
    try:
        values = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise UserError(f"--budgets={cfg.budgets}: expected comma-separated step counts") from None
    if not values or values[0] < 1 or 2 * (values[-1] + 1) > cfg.cap:
        raise UserError(f"--budgets={cfg.budgets}: each at least 1, and (K + 1) times the largest within --cap")
    return values


def seed_steps(cfg, out, seed, tasks, added):
    """One seed's runs: stage 1, MoA and its budget points, the baselines, the ablations, adding a task; with
    --full also the transfer matrix and the imbalanced variant. Each step says what it needs."""
    K, B, per_step = len(tasks), budgets(cfg), train_lora.LoRAConfig.batch_size
    run_dir = f"{out}/runs/seed{seed}"
    E, M, X = f"{run_dir}/experts", f"{run_dir}/moa", f"{run_dir}/mixed"
    common = [f"--data_dir={cfg.data_dir}", f"--base={out}/base", f"--seed={seed}", f"--device={cfg.device}"]
    plateau = [f"--stop_flat={cfg.stop_flat}", f"--max_iters={cfg.cap}"]
    saves = sorted({(K + 1) * b for b in B} | {2 * b for b in B})  # equal records, equal updates
    baseline_saves = [f"--save_at={','.join(map(str, [s for s in saves if s <= cfg.cap]))}"]
    stage1 = [f"{E}/{t}.safetensors" for t in tasks]
    moa, mixed = f"{M}/moa.safetensors", f"{X}/all.safetensors"
    router = common + [f"--experts={E}", f"--out_dir={M}"]
    S = cfg.cap // 2 * per_step  # what a plateau run costs, about
    steps = [
        Step(
            f"seed {seed}: stage 1, {K} experts",
            stage1[-1],
            train_lora,
            common
            + [f"--domain={','.join(tasks)}", f"--out_dir={E}", "--name=stage1", f"--save_at={','.join(map(str, B))}"]
            + plateau,
            cost=K * S,
        ),
        Step(
            f"seed {seed}: one LoRA on all tasks",
            mixed,
            train_lora,
            common + ["--domain=all", f"--out_dir={X}"] + plateau + baseline_saves,
            cost=S,
        ),
        Step(
            f"seed {seed}: one LoRA, rank {8 * K}",
            f"{X}/all_r{K}.safetensors",
            train_lora,
            common
            + ["--domain=all", f"--out_dir={X}", f"--rank={8 * K}", f"--name=all_r{K}"]
            + plateau
            + baseline_saves,
            cost=S,
        ),
        Step(
            f"seed {seed}: MoE-LoRA naive",
            f"{M}/moe_lora_naive.safetensors",
            train_router,
            router
            + ["--mode=token", "--eta=0", "--expert_init=random", "--name=moe_lora_naive"]
            + plateau
            + baseline_saves,
            cost=2 * S,
        ),
        Step(f"seed {seed}: MoA (joint)", moa, train_router, router + plateau, stage1, cost=S),
        Step(
            f"seed {seed}: MoA, routers only",
            f"{M}/moa_routers.safetensors",
            train_router,
            router + ["--train_experts=False", "--name=moa_routers"] + plateau,
            stage1,
            cost=S / 3,
        ),
        Step(
            f"seed {seed}: MoE-LoRA",
            f"{M}/moe_lora.safetensors",
            train_router,
            router + ["--mode=token", "--eta=0", "--name=moe_lora"] + plateau,
            stage1,
            cost=2 * S,
        ),
    ]
    steps += [
        Step(
            f"seed {seed}: MoA at budget {b}",
            f"{M}/moa_b{b}.safetensors",
            train_router,
            router + [f"--expert_step={b}", f"--max_iters={b}", f"--name=moa_b{b}"],
            stage1,
            cost=b * per_step,
        )
        for b in B
    ]
    if cfg.quick:
        return steps[:1] + steps[4:5]
    if added is not None:
        steps += adding_steps(cfg, seed, common, E, M, X, tasks, added, plateau, S)
    if cfg.full:
        steps += full_steps(cfg, out, seed, common, E, tasks, plateau, S)
    return steps


def adding_steps(cfg, seed, common, E, M, X, tasks, added, plateau, S):
    """A held-back task added later: its expert, the new router row (or every row), and the alternatives."""
    new, moa, per_step = f"{E}/{added}.safetensors", f"{M}/moa.safetensors", train_lora.LoRAConfig.batch_size
    add = common + [
        f"--experts={E}",
        f"--out_dir={M}",
        f"--add_domain={added}",
        f"--bundle={moa}",
        f"--max_iters={cfg.add_iters}",
    ]
    cost = cfg.add_iters * per_step
    return [
        Step(
            f"seed {seed}: the {added} expert",
            new,
            train_lora,
            common + [f"--domain={added}", f"--out_dir={E}"] + plateau,
            [E + f"/{tasks[-1]}.safetensors"],
            cost=S,
        ),
        Step(f"seed {seed}: MoA + {added}", f"{M}/moa+{added}.safetensors", train_router, add, [moa, new], cost=cost),
        Step(
            f"seed {seed}: MoA + {added}, every router row",
            f"{M}/moa+{added}_allrows.safetensors",
            train_router,
            add + ["--train_old_rows=True", f"--name=moa+{added}_allrows"],
            [moa, new],
            cost=cost,
        ),
        Step(
            f"seed {seed}: the mixed LoRA trained on {added}",
            f"{X}/all+{added}.safetensors",
            train_lora,
            common
            + [
                f"--domain={added}",
                f"--init_expert={X}/all.safetensors",
                f"--name=all+{added}",
                f"--out_dir={X}",
                f"--max_iters={cfg.add_iters}",
            ],
            [f"{X}/all.safetensors"],
            cost=cost,
        ),
        Step(
            f"seed {seed}: MoA retrained on {len(tasks) + 1} tasks",
            f"{M}/moa_all.safetensors",
            train_router,
            common
            + [f"--experts={E}", f"--out_dir={M}", f"--domains={','.join(tasks + [added])}", "--name=moa_all"]
            + plateau,
            [E + f"/{t}.safetensors" for t in tasks] + [new],
            cost=S,
        ),
    ]


def full_steps(cfg, out, seed, common, E, tasks, plateau, S):
    """--full: the transfer matrix (every task alone and with each other one, the same records of each), the
    imbalanced variant (one task with a tenth of the records), and, for seed 1, the regime without skills."""
    run_dir, per_step, K = f"{out}/runs/seed{seed}", train_lora.LoRAConfig.batch_size, len(tasks)
    pairs = [f"{a}+{b}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    small, small_data, imb = tasks[1], small_data_dir(cfg, tasks), f"{run_dir}/imbalanced"
    on_small = [f"--data_dir={small_data}", *common[1:]]  # common[0] is --data_dir
    matrix = [f"--domain={','.join(tasks + pairs)}", f"--out_dir={run_dir}/pairs", "--name=matrix"]
    steps = [
        Step(
            f"seed {seed}: transfer matrix",
            f"{run_dir}/pairs/{pairs[-1]}.safetensors",
            train_lora,
            common + matrix + [f"--max_iters={cfg.pair_steps}", f"--eval_interval={cfg.pair_steps}"],
            cost=cfg.pair_steps * per_step * K * K,
        ),
        Step(
            f"seed {seed}: imbalanced, the {small} expert",
            f"{imb}/experts/{small}.safetensors",
            train_lora,
            on_small + [f"--domain={small}", f"--out_dir={imb}/experts"] + plateau,
            [f"{small_data}/meta.json"],
            cost=S,
        ),
        Step(
            f"seed {seed}: imbalanced, MoA",
            f"{imb}/moa.safetensors",
            train_router,
            on_small + [f"--experts={imb}/experts,{E}", f"--out_dir={imb}"] + plateau,
            [f"{imb}/experts/{small}.safetensors"] + [f"{E}/{t}.safetensors" for t in tasks],
            cost=S,
        ),
        Step(
            f"seed {seed}: imbalanced, one LoRA on all tasks",
            f"{imb}/all.safetensors",
            train_lora,
            on_small + ["--domain=all", f"--out_dir={imb}"] + plateau,
            [f"{small_data}/meta.json"],
            cost=S,
        ),
    ]
    if seed == 1:  # the other regime: a base that never saw the skills, its experts and mixed LoRA
        plain_dir, plain_base = f"{run_dir}/plain", f"{out}/base_plain"
        plain = [common[0], f"--base={plain_base}", *common[2:]]
        steps += [
            Step(
                "seed 1: the base without skills",
                f"{plain_base}/ckpt.pt",
                train_base,
                [
                    common[0],
                    f"--out_dir={plain_base}",
                    f"--max_iters={cfg.base_iters}",
                    "--corpus=python,cpp,prose",
                    common[-1],
                ],
                cost=cfg.base_iters * 16 * 3,
            ),
            Step(
                "seed 1: plain base, stage 1",
                f"{plain_dir}/experts/{tasks[-1]}.safetensors",
                train_lora,
                plain + [f"--domain={','.join(tasks)}", f"--out_dir={plain_dir}/experts", "--name=stage1"] + plateau,
                [f"{plain_base}/ckpt.pt"],
                cost=K * S,
            ),
            Step(
                "seed 1: plain base, one LoRA on all tasks",
                f"{plain_dir}/all.safetensors",
                train_lora,
                plain + ["--domain=all", f"--out_dir={plain_dir}"] + plateau,
                [f"{plain_base}/ckpt.pt"],
                cost=S,
            ),
        ]
    return steps


def small_data_dir(cfg, tasks):
    """The imbalanced variant's data set, beside the default one: tasks[1] with a tenth of its records."""
    return f"{cfg.data_dir}_{tasks[1]}_small"


@torch.no_grad()
def examples(cfg, out, tasks, per_task=2):
    """The last step: prompts of every task in one batch, routed by MoA (with the last router's calibrated
    confidence) and answered, beside the same prompts through the mixed LoRA; exact answers marked right (+)
    or wrong (-)."""
    run_dir = f"{out}/runs/seed1"
    gpt, tokenizer = load_base(f"{out}/base")
    moa = fast.enable(load_bundle(f"{run_dir}/moa/moa.safetensors", gpt.to(cfg.device), tokenizer)[0]).eval()
    mixed_path = f"{run_dir}/mixed/all.safetensors"
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
        rows += [(name, encode(enc, p + "\n"), a, True) for p, a in HAND_WRITTEN.get(name, [])[:2]]
    prompts = [p for _, p, _, _ in rows]
    longest = max(len(encode(enc, a)) for _, _, a, _ in rows) + 1
    routed = answers(moa, prompts, longest, data.eot, mode="last")
    decision, confidence = moa.routing["decision"].tolist(), moa.routing["confidence"].tolist()
    plain = answers(mixed, prompts, longest, data.eot) if mixed else [None] * len(rows)
    print(
        "\n[examples] MoA (mode last) against one LoRA on every task: validation prompts, and hand-written "
        "prompts (marked *)"
    )
    for (task, prompt, answer, hand), got, other, k, p in zip(rows, routed, plain, decision, confidence):
        mark = lambda text, answer=answer: f"{'+' if text == answer else '-'} {text!r}"  # noqa: E731
        print(f"{'*' if hand else ' '} {task:>8} | {enc.decode(prompt)!r}")
        print(
            f"           -> expert {moa.domains[k]} ({p:.2f}): {mark(enc.decode(got))}"
            + (f"   mixed LoRA: {mark(enc.decode(other))}" if other is not None else "")
            + f"   (answer {answer!r}, ROUGE-L {rouge_l(enc.decode(got), answer):.2f})"
        )


def where_the_time_went(took):
    """The seconds of every step run, added up by kind (the title without its seed)."""
    kinds = {}
    for title, seconds in took.items():
        kind = title.split(": ", 1)[-1]
        kinds[kind] = kinds.get(kind, 0.0) + seconds
    total = sum(kinds.values()) or 1.0
    print("\n[time] where the time went (step time, summed over seeds; steps side by side overlap):")
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {seconds / 60:6.1f} min  {100 * seconds / total:4.0f}%  {kind}")


def main(argv=None):
    cfg = parse_config(DemoConfig, argv or [])
    cfg.device = pick_device(cfg.device)[0]  # auto -> the device; one that is not here: an error now
    out = f"{cfg.out}/quick" if cfg.quick else cfg.out
    if cfg.quick:
        cfg.base_iters, cfg.cap, cfg.budgets = 200, 120, "20"
    cfg.seeds = cfg.seeds or (3 if cfg.full else 1)
    if cfg.jobs == 0:
        cfg.jobs = (os.cpu_count() or 1) if cfg.device == "cpu" else 1
    t0 = time.time()
    prepared = [Step("data", f"{cfg.data_dir}/meta.json", data.prepare, [f"--out_dir={cfg.data_dir}"])]
    meta_path = f"{cfg.data_dir}/meta.json"
    took = run_steps(prepared, 1, None)
    meta = TaskData(cfg.data_dir).meta
    tasks, added = [t for t in meta["tasks"] if t not in meta["held_back"]], (meta["held_back"] or [None])[0]
    base_args = [f"--data_dir={cfg.data_dir}", f"--out_dir={out}/base", f"--max_iters={cfg.base_iters}"]
    firsts = [Step("base", f"{out}/base/ckpt.pt", train_base, base_args + [f"--device={cfg.device}"])]
    if cfg.full:  # the imbalanced variant: the same data, one task with a tenth of the training records
        small = f"{cfg.data_dir}_{tasks[1]}_small"
        firsts.append(
            Step(
                "data, imbalanced",
                f"{small}/meta.json",
                data.prepare,
                [f"--out_dir={small}", f"--small_task={tasks[1]}"],
                [meta_path],
            )
        )
    took.update(run_steps(firsts, 1, None))
    steps = [s for seed in range(1, cfg.seeds + 1) for s in seed_steps(cfg, out, seed, tasks, added)]
    took.update(run_steps(steps, cfg.jobs, f"{out}/logs"))
    print("\n[results] python results.py", flush=True)
    t_results = time.time()
    results.main(
        [
            f"--out={out}",
            f"--data_dir={cfg.data_dir}",
            f"--device={cfg.device}",
            f"--budgets={','.join(map(str, budgets(cfg)))}",
        ]
        + (["--records=32", "--plots=False"] if cfg.quick else [])
    )
    took["results (python results.py)"] = time.time() - t_results
    examples(cfg, out, tasks)
    where_the_time_went(took)
    print(f"\nfinished in {(time.time() - t0) / 60:.1f} min; the tables are in {out}/results/results.md")
    pictures = sorted(p for p in os.listdir(f"{out}/results") if p.endswith(".png"))
    if pictures:
        print(f"pictures: {', '.join(f'{out}/results/{p}' for p in pictures)}")


if __name__ == "__main__":
    run(main)
