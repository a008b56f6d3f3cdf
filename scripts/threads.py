"""One thread or two, on a quiet machine and beside another CPU-bound process: the measurement behind
config.cpu_threads and demo.py's one-thread jobs.

    python scripts/threads.py

Times 40 LoRA training steps of the default model (batch 32, context 128; bench.py's step), each setting
in a fresh process, best of two, first alone and then with `python -c "while 1: pass"` running beside it.
"""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = f"""
import sys, time, torch
sys.path.insert(0, {ROOT!r})
torch.set_num_threads(int(sys.argv[1]))
import bench
model = bench.lora(bench.DEFAULT, "cpu")
step = bench.train_step(model, *bench.tokens(32, 128, "cpu"))
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range(40):
    step()
print(time.perf_counter() - t)
"""


def seconds(threads):
    run = subprocess.run([sys.executable, "-c", STEPS, str(threads)], capture_output=True, text=True, check=True)
    return float(run.stdout)


def main():
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if busy else None
        try:
            time.sleep(2 if busy else 0)
            one, two = (min(seconds(n) for _ in range(2)) for n in (1, 2))
        finally:
            if hog:
                hog.kill()
        where = "beside a CPU-bound process" if busy else "quiet"
        print(f"{where}: 1 thread {one:.2f} s, 2 threads {two:.2f} s, 2 / 1 = {two / one:.2f}", flush=True)


if __name__ == "__main__":
    main()
