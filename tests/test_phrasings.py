"""scripts/phrasings.py: each prompt counted under the pattern that made it, and the counts are the routing that
evaluate.py reports."""

import os
import shutil
import sys

import pytest

from conftest import REPO_ROOT, TASK_FLAGS, train_tiny_experts

sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
import phrasings  # noqa: E402


@pytest.mark.parametrize("task", ["upper", "lower", "double", "reverse", "count", "arith"])
def test_a_prompt_is_counted_under_the_pattern_that_made_it(task):
    """Every pattern of a task, written as a person might (capitals, a quoted word, an opener, a question mark),
    is found as itself: all its pieces in order ("spell {x} backwards", not "give me {x} backwards"), the most
    fixed text winning where a shorter pattern's is inside it ("reverse {x}" in "reverse the order of {x}")."""
    from data.tasks import PATTERNS, UNSEEN_PATTERNS

    patterns = phrasings.patterns_of(task)
    for pattern, name in [(p, p) for p in PATTERNS[task]] + [(p, f"{p} (unseen)") for p in UNSEEN_PATTERNS[task]]:
        if sum(map(len, phrasings.pieces(pattern))) <= 2:  # arith's bare "{e}": no text of its own
            continue
        text = "Please " + pattern.format(x="'TIGER'", e="45 plus 7", v="add 45 and 7").upper() + "?\n"
        assert phrasings.pattern_of(text, patterns) == name, (text, phrasings.pattern_of(text, patterns))
    assert phrasings.pattern_of("45 + 7\n", phrasings.patterns_of("arith")) == phrasings.NONE


def test_the_counts_are_the_routing_evaluate_reports(tiny_data, tiny_base, tmp_path):
    """On a bundle over arith and reverse, in demo.py's folders: per task, the patterns' prompts add up to the
    split's records (at most --records) and the right ones to evaluate_tasks' routing accuracy on that split."""
    import torch

    import train_router
    from batches import TaskData
    from evaluate import evaluate_tasks
    from files import load_base, load_bundle

    run = tmp_path / "out" / "runs" / "seed1" / "moa"
    train_tiny_experts(tiny_data, tiny_base, tmp_path / "experts", ("arith", "reverse"))
    folders = [
        f"--data_dir={tiny_data}",
        f"--base={tiny_base}",
        f"--experts={tmp_path / 'experts'}",
        f"--out_dir={run}",
    ]
    train_router.main(TASK_FLAGS + folders + ["--domains=arith,reverse", "--train_experts=False", "--max_iters=20"])
    (tmp_path / "out" / "base").mkdir()
    shutil.copy(tiny_base, tmp_path / "out" / "base" / "ckpt.pt")
    gpt, tokenizer = load_base(str(tmp_path / "out" / "base"))
    loaded = load_bundle(str(run / "moa.safetensors"), gpt, tokenizer)[0].eval()
    data = TaskData(tiny_data, "arith,reverse", loaded.config.block_size)
    found = set()
    for mode in ("", "last", "vote"):  # "": the default, vote
        flags = [f"--out={tmp_path / 'out'}", f"--data_dir={tiny_data}", "--records=20", "--device=cpu"]
        counts = phrasings.main(flags + ([f"--mode={mode}"] if mode else []))
        with torch.no_grad():
            scores = evaluate_tasks(loaded, data, 20, generate=False, split="unseen", mode=mode or "vote")
        assert list(counts) == ["arith", "reverse"]
        for task in counts:
            right = sum(r[0] for r, _ in counts[task].values())
            assert sum(t[0] for _, t in counts[task].values()) == 20
            assert right == round(scores[f"route/{task}"] * 20), (mode, task)
        found.add(tuple(scores[f"route/{task}"] for task in counts))
    assert len(found) == 2, "the two modes route these prompts alike: the test cannot tell them apart"
