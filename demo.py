"""The whole of nanoMoA in one command: data, base, experts, routers, baselines, the results, examples.

    python demo.py              # the demo: one seed, MoA against one LoRA with its parameters, adding a task,
                                # on 2 quiet CPU cores in about 15 minutes
    python demo.py --cap=1000 --seeds=3 --ablations   # the README's tables: every row, 3 seeds, to the plateaus
    python demo.py --full       # the study behind the README: 3 seeds, the budget sweep, the transfer matrix,
                                # the imbalanced variant and the base without skills (4-5 hours on 2 cores)
    python demo.py --quick      # a first look in a few minutes, into out/quick/ (numbers not meaningful)
    python demo.py --data_dir=data/mine --out=out/mine   # the same on your own tasks (data/prepare.py --task=...)

On your own data set the base gets the context its longest record needs (--block_size), results.py's tables
name your tasks, and --full leaves out the two variants that need the built-in tasks (imbalanced, regime).

Each step runs the script a user would run by hand (the command is shown as it starts), and is skipped
when its output already exists, so an interrupted run goes on where it stopped. The base is trained
once (out/base); each seed's experts and bundles go to out/runs/seed<N>/. One progress line counts the
work still to go (each step's training records, weighted by its kind's time per record), with an estimate
of the time left; the end prints where the time went.

Every model is trained to its plateau (--stop_flat, the same rule for all, with --cap steps at most),
and each shared LoRA then goes on at stage 2's learning rate to its plateau again, as stage 2 anneals
MoA's experts (the "annealed" rows). Each is also saved on the way at the steps the budget comparisons
need (--save_at): for each budget b of --budgets, MoA's experts after b steps each plus b steps of stage
2, against the baselines after as many training records ((K + 1) b steps) and after as many optimizer
updates (2 b steps). Every task stage runs at a constant learning rate after warmup, so a model saved
at step s is exactly the model a run of s steps gives.

On a CPU, steps that do not wait for each other run side by side, one process per core on one thread each
(--jobs), the one with the longest chain of work waiting on it first, their output in out/logs/: at
nanoMoA's sizes two one-thread processes do twice one thread's work where one two-thread process does
1.6-1.75 times it (scripts/threads.py), and they do not collapse when another job shares the cores.

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
from moa import SERVE_MODE
from tokenizer import encode, get_tokenizer
from trainer import pick_device


@dataclass
class DemoConfig:
    full: bool = False  # the whole study, 4-5 h on 2 cores: 3 seeds, 3 budgets, matrix, imbalanced, plain base
    ablations: bool = False  # also rank-r LoRA, routers alone, experts annealed alone, other ways to add (--full: on)
    quick: bool = False  # a first look in a few minutes, into out/quick (numbers not meaningful)
    seeds: int = 0  # runs after the base, with seeds 1..seeds (0: 1, or 3 with --full)
    data_dir: str = "data/default"  # the data set (data/prepare.py); the default one is prepared first if missing
    out: str = "out"  # where everything goes: base/, runs/seed<N>/, results/, logs/
    base_iters: int = 1200  # steps of the base's pretraining
    block_size: int = 0  # the base's context; 0: 128, or the next multiple of 64 that fits the data's longest record
    cap: int = 0  # an expert's most steps to its plateau (a shared LoRA's: K times it); 0: 300, or 1000 with --full
    stop_flat: float = 0.02  # the plateau rule (trainer.flat): less than 2% better over the last 20% of steps
    budgets: str = ""  # stage-1 steps per expert at each budget point; "": 100, or 100,300,600 with --full
    pair_steps: int = 300  # steps of each LoRA of the transfer matrix (--full): the same records of task i in each
    add_iters: int = 300  # steps of the new router row when a task is added
    device: str = "auto"  # every step's: auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    jobs: int = 0  # steps at once, each a process on one thread; 0: one per CPU core on a CPU, 1 on a GPU

    CHECKS = {
        "seeds": AT_LEAST_0,
        "base_iters": AT_LEAST_1,
        "block_size": AT_LEAST_0,
        "cap": AT_LEAST_0,
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
    cost: float = 1.0  # its time, about, in stage-1 training records (Plan.weigh): what the progress bar counts
    ablation: bool = False  # run with --ablations or --full only: not one of the demo's rows

    def command(self):
        return ["python", os.path.relpath(self.script.__file__), *self.args]


def chains(steps):
    """{title: the step's cost plus that of the costliest chain of steps waiting for it (each needing the one
    before)}. run_steps starts the ready step with the longest chain first: on the demo's measured step times
    its training ends 0.8 min sooner so than in the plan's order (simulated; LOG.md, 2026-12-03, fourth
    session)."""
    waiting = {s.title: [t for t in steps if s.output in t.needs] for s in steps}
    found = {}

    def chain(s):
        if s.title not in found:
            found[s.title] = s.cost + max((chain(t) for t in waiting[s.title]), default=0.0)
        return found[s.title]

    return {s.title: chain(s) for s in steps}


def run_steps(steps, jobs, log_dir):
    """Runs the steps whose output does not exist yet, each as `python script args` in a process of its own,
    up to `jobs` at once and each once the files it needs exist, the longest chain of work first (chains).
    With more than one at a time each runs on one thread with its output in log_dir/<title>.log; alone, it
    prints as it goes. A failed step stops the others and ends the run with a one-line error naming its log.
    Returns {title: seconds} of the steps run."""
    todo = []
    for s in steps:
        if os.path.exists(s.output):
            print(f"[skip] {s.title}: {s.output} exists")
        else:
            todo.append(s)
    progress, first = Progress(sum(s.cost for s in todo), jobs), chains(todo)
    running, took = {}, {}  # process -> (step, start time, log file or None); title -> seconds
    try:
        while todo or running:
            ready = [s for s in todo if all(os.path.exists(n) for n in s.needs)]
            ready.sort(key=lambda s: -first[s.title])  # stable: equal chains keep the plan's order
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
                progress.done(s, took[s.title], running.values())
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
    """The share of the work done (by the steps' costs) and the time left: the work not done, at the seconds per
    unit of cost the finished steps took, shared by the jobs (a running step counts what it has left of its
    expected time)."""

    def __init__(self, total, jobs=1):
        self.total, self.jobs, self.finished, self.spent, self.t0 = total, jobs, 0.0, 0.0, time.time()

    def done(self, step, seconds, running=()):
        """After `step` ended in `seconds`; running: (step, start time) of the steps still running."""
        self.finished += step.cost
        self.spent += seconds
        now = time.time()
        print(
            f"[{step.title}] done in {seconds:.0f}s | {100 * self.finished / max(self.total, 1e-9):.0f}% of the "
            f"work, {(now - self.t0) / 60:.1f} min so far, about {self.left(running, now) / 60:.0f} min left",
            flush=True,
        )

    def left(self, running, now):
        """Seconds left, about: the steps not started at the pace so far, plus what the running ones have left of
        their expected time, over the jobs."""
        pace = self.spent / max(self.finished, 1e-9)  # seconds per unit of cost
        waiting = self.total - self.finished - sum(s.cost for s, _ in running)
        work = waiting * pace + sum(max(s.cost * pace - (now - t), 0) for s, t in running)
        return max(work, 0.0) / self.jobs


def budgets(cfg):
    text = cfg.budgets or ("100,300,600" if cfg.full else "100")  # 50 and 150: every variant under 21% (LOG.md)
    try:
        values = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise UserError(f"--budgets={cfg.budgets}: expected comma-separated step counts") from None
    if not values or values[0] < 1 or values[-1] >= cfg.cap:
        raise UserError(f"--budgets={cfg.budgets}: steps of at least 1, each below --cap={cfg.cap}")
    return values


def seed_steps(cfg, out, seed, tasks, added, builtin=True):
    """One seed's runs: stage 1, MoA and its budget points, the baselines, the ablations, adding a task; with
    --full, for seed 1, also the transfer matrix, and on the built-in tasks the imbalanced variant and the base
    without skills."""
    plan = Plan(cfg, out, seed, tasks)
    if cfg.quick:
        return plan.stage1() + plan.moa()[:1]
    steps = plan.stage1() + plan.stage1_annealed() + plan.baselines() + plan.moa() + plan.budgets()
    if not cfg.full:  # the ablations trained per token (the slowest runs) are --full's
        steps = [s for s in steps if "MoE-LoRA" not in s.title]
    if added is not None:
        steps += plan.adding(added)
    if not (cfg.full or cfg.ablations):  # the demo: MoA against one LoRA with its parameters, and adding a task
        steps = [s for s in steps if not s.ablation]
    if cfg.full and seed == 1:  # one seed of each: the controls above carry the spread over seeds
        steps += plan.matrix() + (plan.imbalanced() + plan.regime() if builtin else [])
    return steps


def built_in(meta):
    """Whether a data set holds the built-in tasks and skills corpus (the imbalanced and regime runs need them)."""
    generated = [t for t, info in meta["tasks"].items() if info["source"].startswith("generated")]
    return len(generated) > 1 and "skills" in meta["corpus"]


def base_context(meta):
    """The context a base needs for the data set's records: 128, or the next multiple of 64 that fits the longest."""
    longest = max(v for info in meta["tasks"].values() for k, v in info.items() if k.endswith("_longest"))
    return data.prepare.fitting_context(longest)


class Plan:
    """The steps of one seed, each the command a user would type, with the files it needs and its cost (weigh).
    Paths: out/runs/seed<N>/{experts,mixed,moa}."""

    # A training record's time in each kind of run, against one of stage 1's (5.6 ms on one thread; measured on
    # the demo's steps, LOG.md 2026-12-03): a LoRA alone evaluates every task, a wider LoRA costs more, stage 2
    # runs the routers and their evaluation too; per token (MoE-LoRA), 12.0 ms a record against stage 1's 4.1 ms,
    # side by side in one study (LOG.md, 2026-12-03, seventh session).
    WEIGHT = {"stage1": 1.0, "lora": 1.2, "wide": 1.4, "moa": 2.3, "routers": 1.4, "token": 2.9}

    def __init__(self, cfg, out, seed, tasks):
        self.cfg, self.out, self.seed, self.tasks, self.K = cfg, out, seed, tasks, len(tasks)
        self.run = f"{out}/runs/seed{seed}"
        self.E, self.M, self.X = f"{self.run}/experts", f"{self.run}/moa", f"{self.run}/mixed"
        self.common = [f"--data_dir={cfg.data_dir}", f"--base={out}/base", f"--seed={seed}", f"--device={cfg.device}"]
        self.plateau = [f"--stop_flat={cfg.stop_flat}", f"--max_iters={cfg.cap}"]
        # a shared LoRA (or MoE-LoRA naive) may see as many records as the K experts together: K times the steps
        self.shared_plateau = [f"--stop_flat={cfg.stop_flat}", f"--max_iters={self.K * cfg.cap}"]
        self.router = self.common + [f"--experts={self.E}", f"--out_dir={self.M}"]
        self.stage1_files = [f"{self.E}/{t}.safetensors" for t in tasks]
        self.per_step = train_lora.LoRAConfig.batch_size

    def weigh(self, kind, steps=None, tasks=1):
        """A step's cost: the records it sees at its cap (steps of `tasks` batches; steps: --cap), weighted by
        its kind's time per record (WEIGHT). Most of the demo's runs reach their caps; the study's stop sooner,
        and the progress bar's estimate follows the pace measured so far."""
        return (self.cfg.cap if steps is None else steps) * tasks * self.per_step * self.WEIGHT[kind]

    def step(self, what, output, script, args, needs=(), cost=0.0, ablation=False):
        return Step(f"seed {self.seed}: {what}", output, script, args, list(needs), cost, ablation)

    def stage1(self):
        """The K experts in one run (each exactly as its own run), saved on the way at the budgets' steps."""
        tasks, saves = ",".join(self.tasks), ",".join(map(str, budgets(self.cfg)))
        args = self.common + [f"--domain={tasks}", f"--out_dir={self.E}", "--name=stage1", f"--save_at={saves}"]
        return [
            self.step(
                f"stage 1, {self.K} experts",
                self.stage1_files[-1],
                train_lora,
                args + self.plateau,
                cost=self.weigh("stage1", tasks=self.K),
            )
        ]

    def stage1_annealed(self):
        """Each stage-1 expert gone on alone at stage 2's learning rate to its plateau (an ablation): the annealing
        stage 2 gives MoA's experts, without the routers or the other tasks' records."""
        anneal = self.common + [f"--learning_rate={train_router.RouterConfig.learning_rate}"] + self.plateau
        return [
            self.step(
                f"the {t} expert, annealed",
                f"{self.run}/experts_annealed/{t}.safetensors",
                train_lora,
                anneal
                + [f"--domain={t}", f"--init_expert={e}", f"--name={t}", f"--out_dir={self.run}/experts_annealed"],
                self.stage1_files[-1:],  # the stage-1 run's last file: every expert is written
                self.weigh("stage1"),
                ablation=True,
            )
            for t, e in zip(self.tasks, self.stage1_files)
        ]

    def baselines(self):
        """One LoRA on all tasks at rank r and K r, and MoE-LoRA naive, saved at the steps of equal records
        ((K + 1) b) and equal updates (2 b) of each budget b, and each then annealed as MoA's experts are in stage 2
        (stage 2's rate, to its plateau; MoE-LoRA naive's routers at a tenth of their rate, as its experts)."""
        steps = sorted({(self.K + 1) * b for b in budgets(self.cfg)} | {2 * b for b in budgets(self.cfg)})
        saves = [f"--save_at={','.join(str(s) for s in steps)}"] + self.shared_plateau
        mixed, K, X = self.common + ["--domain=all", f"--out_dir={self.X}"], self.K, self.X
        naive = self.router + ["--mode=token", "--eta=0", "--expert_init=random", "--name=moe_lora_naive"]
        naive += [f"--learning_rate={train_lora.LoRAConfig.learning_rate}"]  # random experts learn at stage 1's rate
        anneal = mixed + [f"--learning_rate={train_router.RouterConfig.learning_rate}"] + self.plateau
        tenth = train_router.RouterConfig.learning_rate / train_lora.LoRAConfig.learning_rate
        naive_annealed = self.router + ["--mode=token", "--eta=0", f"--init_bundle={self.M}/moe_lora_naive.safetensors"]
        naive_annealed += [
            f"--router_lr={train_router.RouterConfig.router_lr * tenth:g}",
            "--name=moe_lora_naive_annealed",
        ]
        return [
            self.step(
                "one LoRA on all tasks",
                f"{X}/all.safetensors",
                train_lora,
                mixed + saves,
                (),
                self.weigh("lora", tasks=K),
                ablation=True,
            ),
            self.step(
                f"one LoRA, rank {8 * K}",
                f"{X}/all_r{K}.safetensors",
                train_lora,
                mixed + [f"--rank={8 * K}", f"--name=all_r{K}"] + saves,
                cost=self.weigh("wide", tasks=K),
            ),
            self.step(
                "one LoRA on all tasks, annealed",
                f"{X}/all_annealed.safetensors",
                train_lora,
                anneal + [f"--init_expert={X}/all.safetensors", "--name=all_annealed"],
                [f"{X}/all.safetensors"],
                self.weigh("lora"),
                ablation=True,
            ),
            self.step(
                f"one LoRA, rank {8 * K}, annealed",
                f"{X}/all_r{K}_annealed.safetensors",
                train_lora,
                anneal + [f"--init_expert={X}/all_r{K}.safetensors", f"--name=all_r{K}_annealed"],
                [f"{X}/all_r{K}.safetensors"],
                self.weigh("wide"),
            ),
            self.step(
                "MoE-LoRA naive",
                f"{self.M}/moe_lora_naive.safetensors",
                train_router,
                naive + saves,
                cost=self.weigh("token", tasks=K),
            ),
            self.step(
                "MoE-LoRA naive, annealed",
                f"{self.M}/moe_lora_naive_annealed.safetensors",
                train_router,
                naive_annealed + self.plateau,
                [f"{self.M}/moe_lora_naive.safetensors"],
                self.weigh("token"),
            ),
        ]

    def moa(self):
        """Stage 2 from the stage-1 experts: MoA (also with routers that read single tokens), its routers alone (also as
        the paper's linear maps), and MoE-LoRA (per token, no label loss)."""
        M, need = self.M, self.stage1_files
        return [
            self.step(
                "MoA (joint)", f"{M}/moa.safetensors", train_router, self.router + self.plateau, need, self.weigh("moa")
            ),
            self.step(
                "MoA, routers over single tokens",
                f"{M}/moa_window1.safetensors",
                train_router,
                self.router + ["--router_window=1", "--name=moa_window1"] + self.plateau,
                need,
                self.weigh("moa"),
                ablation=True,
            ),
            self.step(
                "MoA, routers only",
                f"{M}/moa_routers.safetensors",
                train_router,
                self.router + ["--train_experts=False", "--name=moa_routers"] + self.plateau,
                need,
                cost=self.weigh("routers"),
                ablation=True,
            ),
            self.step(
                "MoA, routers only, linear",
                f"{M}/moa_routers_linear.safetensors",
                train_router,
                self.router
                + ["--train_experts=False", "--router_hidden=0", "--name=moa_routers_linear", *self.plateau],
                need,
                cost=self.weigh("routers"),
                ablation=True,
            ),
            self.step(
                "MoE-LoRA",
                f"{M}/moe_lora.safetensors",
                train_router,
                self.router + ["--mode=token", "--eta=0", "--name=moe_lora"] + self.plateau,
                need,
                cost=self.weigh("token"),
            ),
        ]

    def budgets(self):
        """MoA at each budget b: the experts saved after b steps, then b steps of stage 2."""
        return [
            self.step(
                f"MoA at budget {b}",
                f"{self.M}/moa_b{b}.safetensors",
                train_router,
                self.router + [f"--expert_step={b}", f"--max_iters={b}", f"--name=moa_b{b}"],
                self.stage1_files,
                cost=self.weigh("moa", b),
            )
            for b in budgets(self.cfg)
        ]

    def adding(self, added):
        """A held-back task added later: its expert, the new router row (or every row), and the alternatives: the
        shared LoRA with MoA's parameters (rank K r, annealed) trained on, and MoA retrained on every task."""
        E, M, X, cfg, K = self.E, self.M, self.X, self.cfg, self.K
        new, moa, shared = f"{E}/{added}.safetensors", f"{M}/moa.safetensors", f"{X}/all_r{K}_annealed.safetensors"
        add = self.router + [f"--add_domain={added}", f"--bundle={moa}", f"--max_iters={cfg.add_iters}"]
        name = f"all_r{K}_annealed+{added}"
        further = [f"--domain={added}", f"--init_expert={shared}", f"--name={name}", f"--out_dir={X}"]
        every = [f"--domains={','.join(self.tasks + [added])}", "--name=moa_all"]
        row, further_cost = self.weigh("routers", cfg.add_iters), self.weigh("wide", cfg.add_iters)
        return [
            self.step(
                f"the {added} expert",
                new,
                train_lora,
                self.common + [f"--domain={added}", f"--out_dir={E}"] + self.plateau,
                self.stage1_files[-1:],
                self.weigh("lora"),
            ),
            self.step(f"MoA + {added}", f"{M}/moa+{added}.safetensors", train_router, add, [moa, new], row),
            self.step(
                f"MoA + {added}, every router row",
                f"{M}/moa+{added}_allrows.safetensors",
                train_router,
                add + ["--train_old_rows=True", f"--name=moa+{added}_allrows"],
                [moa, new],
                row,
                ablation=True,
            ),
            self.step(
                f"one LoRA, rank {8 * K}, annealed, trained on {added}",
                f"{X}/{name}.safetensors",
                train_lora,
                self.common + further + [f"--max_iters={cfg.add_iters}"],
                [shared],
                further_cost,
            ),
            self.step(
                f"MoA retrained on {self.K + 1} tasks",
                f"{M}/moa_all.safetensors",
                train_router,
                self.router + every + self.plateau,
                self.stage1_files + [new],
                self.weigh("moa"),
                ablation=True,
            ),
        ]

    def matrix(self):
        """--full: every task alone and with each other one (the same records of each), in one run."""
        pairs = [f"{a}+{b}" for i, a in enumerate(self.tasks) for b in self.tasks[i + 1 :]]
        steps = self.cfg.pair_steps
        args = [f"--domain={','.join(self.tasks + pairs)}", f"--out_dir={self.run}/pairs", "--name=matrix"]
        return [
            self.step(
                "transfer matrix",
                f"{self.run}/pairs/{pairs[-1]}.safetensors",
                train_lora,
                self.common + args + [f"--max_iters={steps}", f"--eval_interval={steps}"],
                cost=self.weigh("stage1", steps, self.K * self.K),
            )
        ]

    def imbalanced(self):
        """--full: tasks[1] with a tenth of the records: its expert (the others are the run's), MoA, and one LoRA on
        the pooled records with MoA's parameters (rank K r), then annealed: the main comparison's flags."""
        small, data, imb, K = self.tasks[1], small_data_dir(self.cfg, self.tasks), f"{self.run}/imbalanced", self.K
        on_small = [f"--data_dir={data}", *self.common[1:]]  # common[0] is --data_dir
        experts = [f"{self.E}/{t}.safetensors" for t in self.tasks]
        wide = f"{imb}/all_r{K}.safetensors"
        anneal = [f"--learning_rate={train_router.RouterConfig.learning_rate}", f"--init_expert={wide}"]
        return [
            self.step(
                f"imbalanced, the {small} expert",
                f"{imb}/experts/{small}.safetensors",
                train_lora,
                on_small + [f"--domain={small}", f"--out_dir={imb}/experts"] + self.plateau,
                [f"{data}/meta.json"],
                self.weigh("lora"),
            ),
            self.step(
                "imbalanced, MoA",
                f"{imb}/moa.safetensors",
                train_router,
                on_small + [f"--experts={imb}/experts,{self.E}", f"--out_dir={imb}"] + self.plateau,
                [f"{imb}/experts/{small}.safetensors"] + experts,
                self.weigh("moa"),
            ),
            self.step(
                f"imbalanced, one LoRA, rank {8 * K}",
                wide,
                train_lora,
                on_small
                + ["--domain=all", f"--rank={8 * K}", f"--name=all_r{K}", f"--out_dir={imb}"]
                + self.shared_plateau,
                [f"{data}/meta.json"],
                self.weigh("wide", tasks=K),
            ),
            self.step(
                f"imbalanced, one LoRA, rank {8 * K}, annealed",
                f"{imb}/all_r{K}_annealed.safetensors",
                train_lora,
                on_small + ["--domain=all", f"--name=all_r{K}_annealed", f"--out_dir={imb}"] + anneal + self.plateau,
                [wide],
                self.weigh("wide"),
            ),
        ]

    def regime(self):
        """--full, seed 1: the other regime, a base that never saw the skills, its experts and mixed LoRA."""
        plain_dir, plain_base, cfg = f"{self.run}/plain", f"{self.out}/base_plain", self.cfg
        plain = [self.common[0], f"--base={plain_base}", *self.common[2:]]
        base_args = [self.common[0], f"--out_dir={plain_base}", f"--max_iters={cfg.base_iters}"]
        base_args += [f"--block_size={cfg.block_size}"] if cfg.block_size else []  # the main base's context
        return [
            Step(
                "seed 1: the base without skills",
                f"{plain_base}/ckpt.pt",
                train_base,
                base_args + ["--corpus=python,cpp,prose", self.common[-1]],
                cost=cfg.base_iters * 16 * 3,  # a base's step on one thread, about 48 stage-1 records' time
            ),
            self.step(
                "plain base, stage 1",
                f"{plain_dir}/experts/{self.tasks[-1]}.safetensors",
                train_lora,
                plain
                + [f"--domain={','.join(self.tasks)}", f"--out_dir={plain_dir}/experts", "--name=stage1"]
                + self.plateau,
                [f"{plain_base}/ckpt.pt"],
                cost=self.weigh("stage1", tasks=self.K),
            ),
            self.step(
                "plain base, one LoRA on all tasks",
                f"{plain_dir}/all.safetensors",
                train_lora,
                plain + ["--domain=all", f"--out_dir={plain_dir}"] + self.shared_plateau,
                [f"{plain_base}/ckpt.pt"],
                self.weigh("lora", tasks=self.K),
            ),
        ]


def small_data_dir(cfg, tasks):
    """The imbalanced variant's data set, beside the default one: tasks[1] with a tenth of its records."""
    return f"{cfg.data_dir}_{tasks[1]}_small"


@torch.no_grad()
def examples(cfg, out, tasks, per_task=2):
    """The last step: prompts of every task in one batch, routed by MoA (with the last router's calibrated
    confidence) and answered, beside the same prompts through one LoRA on every task with MoA's parameters (rank
    K r, annealed); exact answers marked right (+) or wrong (-)."""
    run_dir = f"{out}/runs/seed1"
    gpt, tokenizer = load_base(f"{out}/base")
    moa = fast.enable(load_bundle(f"{run_dir}/moa/moa.safetensors", gpt.to(cfg.device), tokenizer)[0]).eval()
    shared_path = f"{run_dir}/mixed/all_r{len(tasks)}_annealed.safetensors"
    shared, against = None, ""
    if os.path.isfile(shared_path):  # not in --quick
        shared = load_base(f"{out}/base")[0].to(cfg.device)
        rank = add_expert_file(shared, shared_path, tokenizer)["rank"]
        against = f" against one LoRA on every task (rank {rank}, annealed)"
        shared = fast.enable(shared).eval()
    enc, data = get_tokenizer(tokenizer), TaskData(cfg.data_dir, ",".join(tasks))
    rows = []  # (task, prompt tokens, answer text, off the training phrasings?)
    for name in tasks:
        rows += [
            (name, p, enc.decode(r[:-1]), False) for p, r in (data.record(name, "val", i) for i in range(per_task))
        ]
        if name in HAND_WRITTEN:
            rows += [(name, encode(enc, p + "\n"), a, True) for p, a in HAND_WRITTEN[name][:2]]
        else:  # a task of your own: its records in the phrasings of prepare.py --phrasings, if given
            unseen = min(per_task, data.count(name, "unseen"))
            rows += [
                (name, p, enc.decode(r[:-1]), True) for p, r in (data.record(name, "unseen", i) for i in range(unseen))
            ]
    prompts = [p for _, p, _, _ in rows]
    longest = max(len(encode(enc, a)) for _, _, a, _ in rows) + 1
    routed = answers(moa, prompts, longest, data.eot, mode=SERVE_MODE)
    decision, confidence = moa.routing["decision"].tolist(), moa.routing["confidence"].tolist()
    plain = answers(shared, prompts, longest, data.eot) if shared else [None] * len(rows)
    print(
        f"\n[examples] MoA (mode {SERVE_MODE}){against}: validation prompts, and prompts off the training phrasings "
        "(marked *: hand-written for the built-in tasks, your --phrasings for your own)"
    )
    for (task, prompt, answer, hand), got, other, k, p in zip(rows, routed, plain, decision, confidence):
        mark = lambda text, answer=answer: f"{'+' if text == answer else '-'} {text!r}"  # noqa: E731
        print(f"{'*' if hand else ' '} {task:>8} | {enc.decode(prompt)!r}")
        print(
            f"           -> expert {moa.domains[k]} ({p:.2f}): {mark(enc.decode(got))}"
            + (f"   one LoRA: {mark(enc.decode(other))}" if other is not None else "")
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
    cfg.cap = cfg.cap or (1000 if cfg.full else 300)
    if cfg.quick:
        cfg.base_iters, cfg.cap, cfg.budgets = 200, 60, "20"
    cfg.seeds = cfg.seeds or (3 if cfg.full else 1)
    if cfg.jobs == 0:
        cfg.jobs = (os.cpu_count() or 1) if cfg.device == "cpu" else 1
    t0 = time.time()
    meta_path = f"{cfg.data_dir}/meta.json"
    if not os.path.isfile(meta_path) and os.path.normpath(cfg.data_dir) != os.path.normpath(DemoConfig.data_dir):
        raise UserError(f"--data_dir={cfg.data_dir}: no data set there (no meta.json); make it with data/prepare.py")
    prepared = [Step("data", meta_path, data.prepare, [f"--out_dir={cfg.data_dir}"])]
    took = run_steps(prepared, 1, None)
    meta = TaskData(cfg.data_dir).meta
    tasks, added = [t for t in meta["tasks"] if t not in meta["held_back"]], (meta["held_back"] or [None])[0]
    builtin = built_in(meta)
    if cfg.full and not builtin:
        print("[full] the imbalanced variant and the base without skills need the built-in tasks: left out here")
    cfg.block_size = cfg.block_size or base_context(meta)  # the base's context (and the base without skills')
    base_args = [f"--data_dir={cfg.data_dir}", f"--out_dir={out}/base", f"--max_iters={cfg.base_iters}"]
    base_args += [f"--block_size={cfg.block_size}", f"--device={cfg.device}"]
    firsts = [Step("base", f"{out}/base/ckpt.pt", train_base, base_args)]
    if cfg.full and builtin:  # the imbalanced variant: the same data, one task with a tenth of the training records
        small = small_data_dir(cfg, tasks)
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
    steps = [s for seed in range(1, cfg.seeds + 1) for s in seed_steps(cfg, out, seed, tasks, added, builtin)]
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
