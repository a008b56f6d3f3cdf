"""Several LoRAs trained side by side in one run (train_lora.py --domain=a,b,...) are the LoRAs their own runs
give, to the bit: the same records, dropout masks, optimizer state, clipping and plateau; and the plateau rule."""

import os

import pytest
import torch
from safetensors.torch import load_file

import train_lora
from files import read_meta
from trainer import flat

COMMON = ["--batch_size=8", "--eval_iters=1", "--progress=False", "--device=cpu", "--seed=3"]


@pytest.mark.parametrize(
    "history, fraction, stops",
    [
        ([(0, 5.0), (50, 4.0), (100, 3.0), (150, 2.0), (200, 1.0)], 0.02, False),  # still falling
        ([(0, 5.0), (50, 1.0), (100, 1.0), (150, 1.0), (200, 1.0)], 0.02, True),  # flat for the last 3 evaluations
        ([(0, 5.0), (50, 1.0), (100, 1.0), (150, 1.0), (200, 0.985)], 0.02, True),  # 1.5% better: less than 2%
        ([(0, 5.0), (50, 1.0), (100, 1.0), (150, 1.0), (200, 0.97)], 0.02, False),  # 3% better
        ([(0, 5.0), (50, 1.0), (100, 1.2), (150, 1.3), (200, 1.1)], 0.05, True),  # noisy but no better
        ([(0, 5.0), (100, 3.0)], 0.02, False),  # one evaluation before the window: compare it, still falling
        ([(0, 1.0)], 0.02, False),  # nothing before the window
    ],
)
def test_plateau_rule_by_hand(history, fraction, stops):
    """flat: the best loss of the last 20% of steps (at least the last 3 evaluations) is less than `fraction`
    below the best before them."""
    assert flat(history, fraction) is stops


def weights(path):
    return load_file(path)


@pytest.mark.parametrize("extra", [["--lora_dropout=0.1"], ["--stop_flat=0.3", "--stop_after=3", "--eval_interval=1"]])
def test_loras_side_by_side_equal_their_own_runs(tiny_data, tiny_base, tmp_path, extra):
    """An expert, a LoRA on two tasks and the pooled LoRA trained in one run equal, bit for bit, the three trained
    in runs of their own: with LoRA dropout on, and with the plateau rule stopping LoRAs at steps of their own
    (each file says its steps, and at least one stopped before the cap)."""
    args = COMMON + [f"--data_dir={tiny_data}", f"--base={tiny_base}", "--max_iters=8"] + extra
    loras = ["upper", "lower+double", "all"]
    train_lora.main(args + [f"--domain={','.join(loras)}", f"--out_dir={tmp_path / 'joint'}"])
    for lora in loras:
        train_lora.main(args + [f"--domain={lora}", f"--out_dir={tmp_path / 'alone'}"])
    steps = []
    for lora in loras:
        joint, alone = (str(tmp_path / folder / f"{lora}.safetensors") for folder in ("joint", "alone"))
        a, b = weights(joint), weights(alone)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), lora
        assert all(b[k].abs().sum() > 0 for k in b if k.endswith("lora_B")), lora  # they did train
        steps.append(read_meta(joint, "expert")[1]["steps"])
        assert steps[-1] == read_meta(alone, "expert")[1]["steps"]
    if "--stop_flat=0.3" in extra:
        assert min(steps) < 8, steps


def test_budget_snapshots_are_the_shorter_runs(tiny_data, tiny_base, tmp_path):
    """With the constant learning rate of the task stages, the expert --save_at keeps at step 3 is the expert a run
    of 3 steps gives, bit for bit."""
    args = COMMON + [f"--data_dir={tiny_data}", f"--base={tiny_base}", "--domain=upper,arith"]
    train_lora.main(args + ["--max_iters=6", "--save_at=3", f"--out_dir={tmp_path / 'long'}"])
    train_lora.main(args + ["--max_iters=3", f"--out_dir={tmp_path / 'short'}"])
    for name in ("upper", "arith"):
        a = weights(os.path.join(tmp_path, "long", f"{name}@3.safetensors"))
        b = weights(os.path.join(tmp_path, "short", f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
