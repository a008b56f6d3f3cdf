"""What the routers' confidence means: one bundle's temperature fitted on different calib splits, and the mean
confidence it then reports on right and on wrong routes of the validation prompts and of the unseen phrasings.

    python scripts/calibration.py --bundle=out/mine/runs/seed1/moa/moa.safetensors --base=out/mine/base \\
        --data_dir=data/mine --plain_dir=data/mine_plain

data_dir: a data set prepared with --phrasings (its calib split asked in your extra phrasings, and an unseen
split); plain_dir: the same records prepared without them (its calib split: held-out records as they are
phrased). The README's "Your own tasks" section quotes this script's table.
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fast  # noqa: E402  (needs the root on the path)
from batches import TaskData  # noqa: E402
from config import UserError, parse_config, run  # noqa: E402
from evaluate import evaluate_tasks, fit_temperature  # noqa: E402
from files import load_base, load_bundle  # noqa: E402
from trainer import pick_device  # noqa: E402


@dataclass
class CalibrationConfig:
    bundle: str = "out/mine/runs/seed1/moa/moa.safetensors"  # a MoA bundle (train_router.py)
    base: str = "out/mine/base"  # its base
    data_dir: str = "data/mine"  # the data set with calib in your phrasings, and unseen
    plain_dir: str = ""  # the same records prepared without --phrasings ("": that row is left out)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps


def main(argv=None):
    cfg = parse_config(CalibrationConfig, argv or [])
    device = pick_device(cfg.device)[0]
    gpt, tokenizer = load_base(cfg.base)
    moa = fast.enable(load_bundle(cfg.bundle, gpt.to(device), tokenizer)[0]).eval()
    domains = ",".join(moa.domains)
    data = TaskData(cfg.data_dir, domains, moa.config.block_size)
    if not all(data.count(d, "unseen") for d in moa.domains):
        raise UserError(f"{cfg.data_dir} has no unseen split for every task: prepare it with --phrasings")
    temperatures = [("your phrasings (calib)", *fit_temperature(moa, data))]  # (name, T, calib routed right)
    if cfg.plain_dir:
        plain = TaskData(cfg.plain_dir, domains, moa.config.block_size)
        temperatures.append(("held-out records as phrased", *fit_temperature(moa, plain)))
    temperatures.append(("nothing (T = 1)", 1.0, None))
    print("| calibrated on | T | routed right: validation / unseen | confidence right / wrong: validation | unseen |")
    print("|---|---|---|---|---|")
    for name, t, calib in temperatures:
        moa.temperature = t
        cells = []
        for split in ("val", "unseen"):
            r = evaluate_tasks(moa, data, None, 64, generate=False, split=split, mode="last")
            mean = [f"{r[k]:.2f}" if k in r else "-" for k in ("confidence_right", "confidence_wrong")]  # "-": none
            cells.append((r["route_mean"], " / ".join(mean)))
        (val, v), (unseen, u) = cells
        edge = " (every calib route right: the grid's least)" if calib == 1 else ""
        print(f"| {name} | {t:.3g}{edge} | {val:.1%} / {unseen:.1%} | {v} | {u} |")


if __name__ == "__main__":
    run(main)
