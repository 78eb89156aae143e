"""DP-SGD vs non-DP step time, peak memory, and adapter size, measured side by side in one run.

    python benchmarks/dp_step.py                 # batch 32, seq 128 (the target: DP <= 1.2x non-DP)
    python benchmarks/dp_step.py --batch 32 --seq 64 --steps 8

Step times alternate DP and non-DP steps in one process so machine noise hits
both alike; peak memory is each mode's max RSS in its own fresh subprocess.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _setup(batch: int, seq: int):
    import torch
    from fedtune.common.training import data
    from fedtune.common.training.assets import BBC_LABELS
    from fedtune.common.training.model import build_lora_model
    from torch.utils.data import DataLoader

    torch.set_num_threads(2)
    lm = build_lora_model(model_path="", task="seq-cls", labels=list(BBC_LABELS), r=8, alpha=16, dropout=0.0,
                          target_modules=None, ffa=False, seed=0)
    recs = data.read_bbc_news().subset(range(0, 2000, 4))
    ds = data.tokenize(recs, lm.tokenizer, label_set=list(BBC_LABELS), max_length=seq)
    return lm, DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True)


def _stepper(lm, loader, *, dp: bool):
    """Return a function doing one optimizer step (Poisson-sampled and private when ``dp``)."""
    from fedtune.common.privacy import accounting as privacy
    from fedtune.common.training.train import make_optimizer, train_steps

    model = lm.model
    opt = make_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.0)
    model.train()
    if dp:
        model, opt, loader, _ = privacy.make_private(model=model, optimizer=opt, loader=loader, noise_multiplier=1.0,
                                                     max_grad_norm=1.0, grad_sample_mode="hooks")
    return lambda: train_steps(model, loader, opt, steps=1, task="seq-cls")


def memory_child(mode: str, batch: int, seq: int, steps: int) -> None:
    """Peak RSS above the post-setup baseline while training (sampled every 5 ms)."""
    import threading

    import psutil

    lm, loader = _setup(batch, seq)
    step = _stepper(lm, loader, dp=mode == "dp")
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    for _ in range(steps):
        step()
    done.set()
    t.join()
    print(json.dumps({"train_mb": (peak[0] - base) / 2**20, "base_mb": base / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode (after one warm-up)")
    ap.add_argument("--memory-child", choices=["dp", "plain"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.batch, args.seq, 2)

    from fedtune.common.training.adapter import save_adapter
    from fedtune.common.training.assets import default_model_dir

    print(f"fedtune DP-step benchmark: batch {args.batch}, seq {args.seq}, {args.steps} timed steps per mode")
    lm, loader = _setup(args.batch, args.seq)
    plain_lm, dp_lm = copy.deepcopy(lm), copy.deepcopy(lm)
    plain, dp = _stepper(plain_lm, loader, dp=False), _stepper(dp_lm, loader, dp=True)
    plain(), dp()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for _ in range(args.steps):  # interleaved: each pair sees the same machine conditions
        for name, fn in (("plain", plain), ("dp", dp)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    # DP batches are Poisson-sized; report per-step time (same expected batch size)
    mem = {}
    for mode in ("plain", "dp"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--batch", str(args.batch),
                              "--seq", str(args.seq)], capture_output=True, text=True, check=True)
        mem[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        adapter_bytes = (save_adapter(lm.model, d) / "adapter_model.safetensors").stat().st_size
    model_bytes = sum(p.stat().st_size for p in default_model_dir().glob("*.safetensors"))
    trainable, total = lm.trainable_parameters(), lm.total_parameters()

    print(f"{'':28}{'non-DP':>12}{'DP-SGD':>12}{'ratio':>10}")
    print(f"{'seconds per step (median)':28}{med['plain']:>12.3f}{med['dp']:>12.3f}{med['dp'] / med['plain']:>10.2f}x")
    print(f"{'  min / max':28}{min(times['plain']):>5.2f}/{max(times['plain']):<6.2f}"
          f"{min(times['dp']):>5.2f}/{max(times['dp']):<6.2f}")
    tp, td = mem["plain"]["train_mb"], mem["dp"]["train_mb"]
    print(f"{'training memory MB':28}{tp:>12.0f}{td:>12.0f}{td / max(tp, 1e-9):>10.2f}x")
    print(f"{'  (above a baseline RSS of)':28}{mem['plain']['base_mb']:>12.0f}{mem['dp']['base_mb']:>12.0f}")
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    print(f"adapter file: {adapter_bytes:,} bytes vs full model {model_bytes:,} bytes "
          f"({100 * adapter_bytes / model_bytes:.2f}%)")
    verdict = "meets" if med["dp"] / med["plain"] <= 1.2 else "MISSES"
    print(f"target DP <= 1.2x non-DP at batch 32, seq 128: {verdict}")


if __name__ == "__main__":
    main()
