"""demo.py's step runner: steps side by side once what they need exists, skipped when done, stopped on a failure."""

import json
import os
import time
from types import SimpleNamespace

import pytest

import train_lora
import train_router
from config import UserError
from demo import Step, chains, run_steps

# A stand-in script: writes its output (argv[1]) after sleeping argv[2] seconds, with its start and end times and
# its OMP_NUM_THREADS; exits 3 without writing when argv[3] is "fail".
SCRIPT = """
import os, sys, time
start = time.time()
time.sleep(float(sys.argv[2]))
if len(sys.argv) > 3 and sys.argv[3] == "fail":
    print("something broke")
    sys.exit(3)
with open(sys.argv[1], "w") as f:
    f.write(f"{start} {time.time()} {os.environ.get('OMP_NUM_THREADS', '')}")
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "fake_script.py"
    path.write_text(SCRIPT)
    return SimpleNamespace(__file__=str(path))


def times(path):
    start, end, threads = open(path).read().split(" ")
    return float(start), float(end), threads


def test_steps_run_side_by_side_in_order_of_what_they_need(script, tmp_path):
    """With 2 jobs, two independent steps overlap and run on one thread each with their output in the log folder;
    a step that needs both starts after both ended."""
    a, b, c = (str(tmp_path / n) for n in "abc")
    steps = [
        Step("a", a, script, [a, "0.6"]),
        Step("b", b, script, [b, "0.6"]),
        Step("c", c, script, [c, "0"], [a, b]),
    ]
    run_steps(steps, 2, str(tmp_path / "logs"))
    (sa, ea, ta), (sb, eb, tb), (sc, _, _) = times(a), times(b), times(c)
    assert sb < ea and sa < eb  # a and b overlapped
    assert sc >= max(ea, eb)
    assert ta == tb == "1"
    assert sorted(os.listdir(tmp_path / "logs")) == ["a.log", "b.log", "c.log"]


def test_one_job_runs_one_step_at_a_time(script, tmp_path, monkeypatch):
    """With 1 job the steps run one after the other, with the caller's threads."""
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_steps([Step("a", a, script, [a, "0.3"]), Step("b", b, script, [b, "0.3"])], 1, None)
    assert times(b)[0] >= times(a)[1]
    assert times(a)[2] == "7"


def test_a_step_whose_output_exists_is_skipped(script, tmp_path, capsys):
    """A step whose output exists does not run (here it would fail); the next one runs."""
    a, b = tmp_path / "a", str(tmp_path / "b")
    a.write_text("done before")
    run_steps([Step("a", str(a), script, [str(a), "0", "fail"]), Step("b", b, script, [b, "0"])], 2, str(tmp_path))
    assert a.read_text() == "done before" and os.path.isfile(b)
    assert "[skip] a:" in capsys.readouterr().out


def test_a_failed_step_stops_the_others_with_a_one_line_error(script, tmp_path):
    """A step that fails ends run_steps with a UserError naming it, its exit status and its log; the step running
    beside it is stopped (its output never appears) and the step that needed the failed one never starts."""
    bad, slow, after = (str(tmp_path / n) for n in ("bad", "slow", "after"))
    steps = [
        Step("bad", bad, script, [bad, "0.2", "fail"]),
        Step("slow", slow, script, [slow, "5"]),
        Step("after", after, script, [after, "0"], [bad]),
    ]
    t0 = time.time()
    with pytest.raises(UserError, match=r"step 'bad' failed \(exit status 3\); its output: .*bad\.log"):
        run_steps(steps, 2, str(tmp_path / "logs"))
    assert time.time() - t0 < 4
    time.sleep(0.2)
    assert not os.path.exists(slow) and not os.path.exists(after)
    assert "something broke" in open(tmp_path / "logs" / "bad.log").read()


def test_the_ready_step_with_the_longest_chain_of_work_starts_first(script, tmp_path):
    """One job, three steps in the plan's order a, b, c, where c needs b: b (cost 1, but c's 5 wait for it) starts
    first, then c (5), then a (2); chains() adds a step's cost to the costliest chain waiting for it."""
    a, b, c = (str(tmp_path / n) for n in "abc")
    steps = [Step("a", a, script, [a, "0"], [], 2.0), Step("b", b, script, [b, "0"], [], 1.0)]
    steps.append(Step("c", c, script, [c, "0"], [b], 5.0))
    assert chains(steps) == {"a": 2.0, "b": 6.0, "c": 5.0}
    run_steps(steps, 1, None)
    assert times(b)[1] <= times(c)[0] and times(c)[1] <= times(a)[0]


def test_every_step_of_the_study_has_a_cost_and_the_shared_loras_are_annealed_as_moas_experts(tmp_path):
    """Each step of --full's plan has a positive cost (the progress bar and the order count them); the base without
    skills has the main base's context. The annealed shared LoRAs go on from the shared LoRAs' files at stage 2's
    learning rate, to their plateau with MoA's rule and cap, MoE-LoRA naive from its bundle with experts and
    routers at a tenth of their rates; the LoRA trained on the added task goes on from the annealed one with MoA's
    parameters."""
    import demo
    import train_router

    cfg = demo.DemoConfig(full=True, cap=40, budgets="10,20", block_size=192)
    tasks = ["upper", "lower", "double", "reverse", "arith"]
    steps = demo.seed_steps(cfg, str(tmp_path), 1, tasks, "count")
    assert all(s.cost > 0 for s in steps), [s.title for s in steps if not s.cost > 0]
    by_title = {s.title.split(": ", 1)[1]: s for s in steps}
    moa = by_title["MoA (joint)"]
    for shared, annealed in (
        ("one LoRA on all tasks", "one LoRA on all tasks, annealed"),
        ("one LoRA, rank 40", "one LoRA, rank 40, annealed"),
    ):
        step = by_title[annealed]
        assert f"--init_expert={by_title[shared].output}" in step.args and step.needs == [by_title[shared].output]
        assert f"--learning_rate={train_router.RouterConfig.learning_rate}" in step.args
        assert (
            [a for a in step.args if a.startswith(("--max_iters", "--stop_flat"))]
            == [a for a in moa.args if a.startswith(("--max_iters", "--stop_flat"))]
            == ["--stop_flat=0.02", "--max_iters=40"]
        )
    assert "--block_size=192" in by_title["the base without skills"].args  # the main base's context
    naive, step = by_title["MoE-LoRA naive"], by_title["MoE-LoRA naive, annealed"]  # experts and routers at a tenth
    assert f"--init_bundle={naive.output}" in step.args and step.needs == [naive.output]
    assert f"--learning_rate={train_lora.LoRAConfig.learning_rate}" in naive.args
    assert not any(a.startswith("--learning_rate") for a in step.args)  # stage 2's: a tenth of stage 1's
    assert train_router.RouterConfig.learning_rate == pytest.approx(train_lora.LoRAConfig.learning_rate / 10)
    assert f"--router_lr={train_router.RouterConfig.router_lr / 10:g}" in step.args
    assert {"--mode=token", "--eta=0", "--stop_flat=0.02", "--max_iters=40"} <= set(step.args)
    for t in tasks:  # the ablation: each stage-1 expert on alone at stage 2's rate, with MoA's rule and cap
        step = by_title[f"the {t} expert, annealed"]
        assert f"--init_expert={tmp_path}/runs/seed1/experts/{t}.safetensors" in step.args
        assert {f"--domain={t}", f"--learning_rate={train_router.RouterConfig.learning_rate}"} <= set(step.args)
        assert {"--stop_flat=0.02", "--max_iters=40"} <= set(step.args)
    further, wide = by_title["one LoRA, rank 40, annealed, trained on count"], by_title["one LoRA, rank 40, annealed"]
    assert f"--init_expert={wide.output}" in further.args and further.needs == [wide.output]  # MoA's parameters
    # --full's own runs compare with the main rows' flags: a shared LoRA's cap is K times an expert's, the
    # imbalanced variant's shared LoRA has MoA's parameters and is annealed as the main one is
    caps = {t: [a for a in s.args if a.startswith("--max_iters")] for t, s in by_title.items()}
    for shared in ("one LoRA on all tasks", "plain base, one LoRA on all tasks", "imbalanced, one LoRA, rank 40"):
        assert caps[shared] == ["--max_iters=200"], shared
    imbalanced, main_wide = by_title["imbalanced, one LoRA, rank 40"], by_title["one LoRA, rank 40"]
    assert {"--rank=40", "--domain=all"} <= set(imbalanced.args) and "--rank=40" in main_wide.args
    annealed = by_title["imbalanced, one LoRA, rank 40, annealed"]
    assert f"--init_expert={imbalanced.output}" in annealed.args and annealed.needs == [imbalanced.output]
    assert {f"--learning_rate={train_router.RouterConfig.learning_rate}", "--max_iters=40"} <= set(annealed.args)


def test_a_need_that_nothing_makes_is_an_error(script, tmp_path):
    """A step needing a file that no step writes: a UserError naming the file, once nothing else can run."""
    a, missing = str(tmp_path / "a"), str(tmp_path / "missing")
    with pytest.raises(UserError, match="no step can start: missing .*missing"):
        run_steps([Step("a", a, script, [a, "0"], [missing])], 2, str(tmp_path))


def test_demo_steps_then_results_make_every_table(tiny_data, tiny_base, tmp_path, capsys):
    """One seed of demo.py's steps with --ablations (an expert 6 steps at most, a shared LoRA 30, 2 jobs) on a tiny
    base, then results.py: every main row, the controls and the adding-a-task table are there, and the controls
    hold what they name: at budget b, MoA's experts trained b steps each and stage 2 b steps, and the shared LoRA
    saw as many records ((K + 1) b steps) or made as many updates (2 b steps); rank K r has the K experts'
    parameters. Without the ablations' files (the plain demo's runs), results.py writes the demo's rows. The
    examples answer each task's prompts through MoA and through the shared LoRA with MoA's parameters."""
    import shutil

    import demo
    import results

    out = tmp_path / "out"
    (out / "base").mkdir(parents=True)
    shutil.copy(tiny_base, out / "base" / "ckpt.pt")
    cfg = demo.DemoConfig(data_dir=tiny_data, cap=6, budgets="1", add_iters=2, device="cpu", ablations=True)
    tasks = ["upper", "lower", "double", "reverse", "arith"]
    K, per_step = len(tasks), train_lora.LoRAConfig.batch_size
    steps = demo.seed_steps(cfg, str(out), 1, tasks, "count")
    run_steps(steps, 2, str(out / "logs"))
    results.main([f"--out={out}", f"--data_dir={tiny_data}", "--records=8", "--plots=False", "--device=cpu"])
    written = json.loads((out / "results" / "results.json").read_text())
    rows = written["main"][0]
    demo_rows = [name for name, *_ in results.main_rows(results.ResultsConfig(), K) if "MoE-LoRA" not in name]
    assert list(rows) == demo_rows  # the ablations per token are --full's
    experts, mixed, wide = (
        rows["stage-1 experts (label given)"],
        rows["one LoRA, all tasks (rank r)"],
        rows[f"one LoRA, all tasks (rank {K}r)"],
    )
    assert wide["params"] == K * mixed["params"] == experts["params"]
    assert experts["steps"] == 6 and mixed["steps"] == K * 6 and experts["samples"] == mixed["samples"]
    annealed = rows["stage-1 experts, annealed (label given)"]  # each expert on from its stage-1 file, alone
    assert annealed["params"] == experts["params"] and 1 <= annealed["steps"] <= 6
    assert experts["samples"] + K * per_step <= annealed["samples"] <= experts["samples"] + K * 6 * per_step
    for name, before in (("rank r", mixed), (f"rank {K}r", wide)):  # went on from there, and counts both runs' records
        annealed = rows[f"one LoRA, all tasks ({name}), annealed"]
        assert 1 <= annealed["steps"] <= 6 and annealed["params"] == before["params"], name
        assert annealed["samples"] == before["samples"] + annealed["steps"] * per_step, name
    budget = written["budget"][0]
    moa = budget["MoA, budget 1"]
    assert moa["samples"] == (K * 1 + 1) * per_step
    for name in ("one LoRA (rank r)", f"one LoRA (rank {K}r)"):
        assert budget[f"{name}, budget 1, equal records"]["samples"] == moa["samples"], name
        assert budget[f"{name}, budget 1, equal updates"]["steps"] == 1 + 1, name
    added = written["adaptation"][0]
    shared = added[f"one LoRA (rank {K}r, annealed) before"]
    annealed_wide = rows[f"one LoRA, all tasks (rank {K}r), annealed"]
    assert all(shared[f"loss/{t}"] == pytest.approx(annealed_wide[f"loss/{t}"], rel=1e-5) for t in tasks)
    assert "MoA + count (new router row only)" in added and "the same LoRA, trained on count" in added
    assert len(added) == 7
    text = (out / "results" / "results.md").read_text()
    assert "Adding the task count" in text and "under each control" in text
    capsys.readouterr()
    demo.examples(cfg, str(out), tasks)
    printed = capsys.readouterr().out
    assert f"MoA (mode vote) against one LoRA on every task (rank {8 * K}, annealed)" in printed
    assert printed.count("one LoRA: ") == printed.count("-> expert ") == 4 * K  # 2 validation, 2 hand-written

    # the plain demo: the same steps but the ablations; results.py writes the rows whose files it finds
    cfg.ablations = False
    plain = demo.seed_steps(cfg, str(out), 1, tasks, "count")
    assert [s.title for s in plain] == [s.title for s in steps if not s.ablation]
    assert {s.title.split(": ")[1] for s in steps if s.ablation} == {
        *(f"the {t} expert, annealed" for t in tasks),
        "one LoRA on all tasks",
        "one LoRA on all tasks, annealed",
        "MoA, routers only",
        "MoA, routers only, linear",
        "MoA, routers over single tokens",
        "MoA + count, every router row",
        "MoA retrained on 6 tasks",
    }
    for s in steps:
        if s.ablation:
            os.remove(s.output)
    rcfg = results.ResultsConfig(out=str(out), data_dir=tiny_data, records=2, device="cpu")
    adapted = results.adaptation(rcfg, str(out / "runs" / "seed1"), tasks, "count")
    assert set(adapted) == set(added) - {"MoA + count (every router row retrained)", "MoA retrained on K+1 tasks"}
    kept = {n: r for n, r in rows.items() if "rank r" not in n and "routers " not in n and "annealed (" not in n}
    budget = {n: r for n, r in budget.items() if "rank r" not in n}
    stats = {k: results.aggregate([v]) for k, v in (("main", kept), ("budget", budget), ("adaptation", adapted))}
    text = results.write_tables(rcfg, stats, tasks, [1], "count", [str(out / "runs" / "seed1")])
    assert "routers only" not in text and "single tokens" not in text and "the same LoRA, trained on count" in text
    assert "| control | MoA | one LoRA (rank 5r) |\n" in text  # no column for the runs the demo leaves out


def test_the_full_studys_own_runs_run_and_make_their_tables(tiny_data, tiny_base, tmp_path):
    """--full's runs of seed 1 on a tiny data set (an expert 2 steps at most, the matrix 1 step per LoRA, the base
    without skills 2 steps), then results.py: the K x K matrix from LoRAs that saw the same records of task i
    (a pair's LoRA twice as many in all), the imbalanced variant on data with a tenth of tasks[1]'s records (its
    shared LoRA with MoA's parameters, then annealed), the regime's six rows from the two bases, and both MoE-LoRA
    runs with MoA's parameters, MoE-LoRA naive also at the budget's records and updates, and annealed."""
    import shutil

    import data.prepare
    import demo
    import results
    from batches import TaskData
    from files import read_meta

    data_dir, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(tiny_data, data_dir)
    (out / "base").mkdir(parents=True)
    shutil.copy(tiny_base, out / "base" / "ckpt.pt")
    cfg = demo.DemoConfig(data_dir=str(data_dir), full=True, cap=2, budgets="1", pair_steps=1, base_iters=2)
    cfg.device = "cpu"
    tasks = ["upper", "lower", "double", "reverse", "arith"]
    small = demo.small_data_dir(cfg, tasks)
    data.prepare.main(
        [f"--out_dir={small}", "--max_tokens=20000", "--records=2000", "--val_records=64", "--small_task=lower"]
    )
    plan = demo.Plan(cfg, str(out), 1, tasks)
    # what the imbalanced and regime rows need beside them: the stage-1 experts and the rank-r LoRA
    steps = plan.stage1() + [s for s in plan.baselines() if s.title.endswith("one LoRA on all tasks")]
    steps += plan.matrix() + plan.imbalanced() + plan.regime()
    steps += [s for s in plan.baselines() + plan.moa() if "MoE-LoRA" in s.title]
    run_steps(steps, 2, str(out / "logs"))
    results.main(
        [f"--out={out}", f"--data_dir={data_dir}", "--records=4", "--plots=False", "--device=cpu", "--budgets=1"]
    )
    written = json.loads((out / "results" / "results.json").read_text())
    run = out / "runs" / "seed1"

    cells = written["matrix"][0]
    assert set(cells) == {f"{a}|{b}" for a in tasks for b in tasks}
    per_step = train_lora.LoRAConfig.batch_size
    alone = read_meta(str(run / "pairs" / "upper.safetensors"), "expert")[1]
    pair = read_meta(str(run / "pairs" / "upper+arith.safetensors"), "expert")[1]
    assert alone["samples"] == per_step and pair["samples"] == 2 * alone["samples"]  # i's records equal

    counts = {t: TaskData(small, t).count(t, "train") for t in tasks}
    assert counts["lower"] == counts["upper"] // 10 and counts["double"] == counts["upper"]
    rows = written["imbalanced"][0]
    K = len(tasks)
    wide, annealed = (
        rows[f"one LoRA, all tasks, pooled (rank {K}r)"],
        rows[f"one LoRA, all tasks, pooled (rank {K}r), annealed"],
    )
    assert wide["params"] == annealed["params"] == rows["stage-1 experts (label given)"]["params"]
    assert 1 <= annealed["steps"] <= 2 and annealed["samples"] == wide["samples"] + annealed["steps"] * per_step
    assert "MoA (joint)" in rows

    regime, main = written["regime"][0], written["main"][0]
    assert len(regime) == 6
    for mine, theirs in (
        ("stage-1 experts", "stage-1 experts (label given)"),
        ("one LoRA (rank r)", "one LoRA, all tasks (rank r)"),
    ):
        assert regime[f"with skills: {mine}"]["loss_mean"] == pytest.approx(main[theirs]["loss_mean"])  # their files
    plain = regime["without skills: one LoRA (rank r)"]  # on the other base (the default size, the tiny one's corpus)
    assert 1 <= plain["steps"] <= K * 2 and 1 <= regime["without skills: stage-1 experts"]["steps"] <= 2
    assert plain["loss_mean"] != pytest.approx(main["one LoRA, all tasks (rank r)"]["loss_mean"])
    text = (out / "results" / "results.md").read_text()
    assert "Transfer and interference" in text and "The imbalanced variant: lower" in text and "The regime" in text

    naive, mixing = main["MoE-LoRA naive (random experts)"], main["MoE-LoRA (token top-2, no label loss)"]
    assert naive["params"] == mixing["params"] > main["stage-1 experts (label given)"]["params"]  # + the routers
    batch = train_router.RouterConfig.batch_size
    assert 1 <= naive["steps"] <= K * 2 and naive["samples"] == naive["steps"] * batch  # random experts: no stage 1
    assert 1 <= mixing["steps"] <= 2 and naive["routing"] == mixing["routing"] == "token"
    on = main["MoE-LoRA naive (random experts), annealed"]  # its records count on from MoE-LoRA naive's
    assert on["params"] == naive["params"] and on["routing"] == "token"
    assert 1 <= on["steps"] <= 2 and on["samples"] == naive["samples"] + on["steps"] * batch
    budget = written["budget"][0]
    for control, steps in (("equal records", K + 1), ("equal updates", 2)):
        row = budget[f"MoE-LoRA naive, budget 1, {control}"]
        assert row["samples"] == min(steps, naive["steps"]) * batch


def test_the_budget_picture_draws_each_shared_lora_on_to_its_annealed_row(tmp_path):
    """pictures.points: a shared LoRA's line holds its budget rows, its plateau row and then its annealed row, in
    order of records; MoA's line its budget rows and its plateau. budget() draws them into budget.png."""
    import pictures

    def row(records, em, **more):
        return {"samples": (records, 0.0, 3), "em_mean": (em, 0.01, 3), **more}

    stats = {
        "budget": {
            "MoA, budget 100": row(19_200, 0.004, variant="MoA"),
            "one LoRA (rank r), budget 100, equal records": row(19_200, 0.034, variant="one LoRA (rank r)"),
            "one LoRA (rank r), budget 100, equal updates": row(6_400, 0.004, variant="one LoRA (rank r)"),
        },
        "main": {
            "MoA (joint)": row(166_933, 0.501),
            "one LoRA, all tasks (rank r)": row(120_533, 0.312),
            "one LoRA, all tasks (rank r), annealed": row(135_466, 0.570),
        },
    }
    shared, main_rows = pictures.VARIANTS["one LoRA (rank r)"]
    assert [p[:2] for p in pictures.points(stats, shared, main_rows, "em_mean")] == [
        (6_400, 0.004),
        (19_200, 0.034),
        (120_533, 0.312),
        (135_466, 0.570),
    ]
    assert [p[0] for p in pictures.points(stats, "MoA", pictures.VARIANTS["MoA"][1], "em_mean")] == [19_200, 166_933]
    plt = pytest.importorskip("matplotlib.pyplot")
    assert pictures.budget(plt, stats, ["upper"], str(tmp_path)).endswith("budget.png")
    assert (tmp_path / "budget.png").stat().st_size > 1000


def test_the_time_left_counts_the_steps_not_started_and_what_the_running_ones_have_left():
    """At 2 s per unit of cost (a finished step of cost 20 took 40 s), with 40 units not started and a step of cost
    40 running for 30 s (expected 80 s: 50 left), 2 jobs have (40 * 2 + 50) / 2 = 65 s left; a running step past
    its expected time counts nothing."""
    from demo import Progress

    progress = Progress(total=100, jobs=2)
    first, running = Step("a", "a", None, [], [], 20.0), Step("b", "b", None, [], [], 40.0)
    progress.done(first, 40.0, [(running, time.time() - 30)])
    assert progress.left([(running, 1000.0 - 30)], now=1000.0) == pytest.approx(65.0)
    assert progress.left([(running, 1000.0 - 500)], now=1000.0) == pytest.approx(40.0)
