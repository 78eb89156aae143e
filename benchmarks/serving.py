"""Export sizes and time, merged-vs-adapter agreement, and inference throughput, measured in one run.

    python benchmarks/serving.py RUN_DIR                 # e.g. the demo's run directory
    python benchmarks/serving.py RUN_DIR --texts 512 --reps 3

Throughput alternates the merged model (what `fedtune predict` serves) and the unmerged base +
PEFT adapter on the same BBC News texts in one process, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from fedtune.common.serving.export import export_run
    from fedtune.common.serving.inference import Classifier
    from fedtune.common.training.assets import default_model_dir
    from fedtune.common.training.data import read_bbc_news
    from fedtune.common.training.model import use_mean_pooling
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        t0 = time.perf_counter()
        rec = export_run(args.run_dir, out)
        export_s = time.perf_counter() - t0
        files = rec["files"]
        total = sum(f["size"] for f in files.values())
        adapter_total = sum(f["size"] for k, f in files.items() if k.startswith("adapter/"))
        print(f"export of {rec['source']['run']} ({rec['source']['checkpoint']}): {export_s:.1f} s")
        print(f"  directory {total / 1e6:.1f} MB: model.safetensors {files['model.safetensors']['size'] / 1e6:.1f} MB, "
              f"tokenizer {sum(f['size'] for k, f in files.items() if k.startswith('tokenizer')) / 1e6:.2f} MB, "
              f"adapter/ {adapter_total / 1e3:.1f} kB (adapter_model.safetensors "
              f"{files['adapter/adapter_model.safetensors']['size'] / 1e3:.1f} kB), model card "
              f"{files['README.md']['size'] / 1e3:.1f} kB")

        t0 = time.perf_counter()
        clf = Classifier(out, batch_size=32)
        load_verified = time.perf_counter() - t0
        t0 = time.perf_counter()
        Classifier(out, batch_size=32, verify=False)
        load_plain = time.perf_counter() - t0
        print(f"  load (in a warm process): {load_verified:.2f} s with sha256 verification, {load_plain:.2f} s without")

        labels = rec["model"]["labels"]
        base = AutoModelForSequenceClassification.from_pretrained(str(default_model_dir()), num_labels=len(labels),
                                                                  local_files_only=True)
        if rec["model"].get("pooling") == "mean":  # the head reads mean-pooled features, as it was trained
            use_mean_pooling(base)
        peft = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True, trust_remote_code=False)
        texts = read_bbc_news().texts[: args.texts]
        ml = clf.max_length
        with torch.no_grad():
            enc = tok(texts[:64], padding=True, truncation=True, max_length=ml, return_tensors="pt")
            diff = (peft(**enc).logits - clf.model(**enc).logits).abs().max().item()
        print(f"  merged vs base + adapter (PEFT): max |logit difference| {diff:.2e} over 64 texts")

        def run_peft(bs: int) -> None:
            with torch.no_grad():
                for i in range(0, len(texts), bs):
                    peft(**tok(texts[i:i + bs], padding=True, truncation=True, max_length=ml, return_tensors="pt"))

        print(f"\ninference throughput, {len(texts)} BBC News texts truncated to {ml} tokens, {args.threads} threads, "
              f"median of {args.reps} (texts/s):")
        print(f"{'batch':>6} {'merged (predict)':>17} {'base+adapter':>13} {'ratio':>6}")
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            clf.batch_size = bs
            m_t, p_t = [], []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                clf.predict(texts)
                m_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                run_peft(bs)
                p_t.append(time.perf_counter() - t0)
            m, p = statistics.median(m_t), statistics.median(p_t)
            print(f"{bs:>6} {len(texts) / m:>17.1f} {len(texts) / p:>13.1f} {p / m:>5.2f}x")


if __name__ == "__main__":
    main()
