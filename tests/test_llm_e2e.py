"""The LLM scenario end to end at tiny settings: SmolLM2 instruction-tuned by 3 simulated organizations (DP-SGD,
secure aggregation) through Flower's simulation engine; exported; loaded by stock transformers in a process
without fedtune; `fedtune generate` streams an answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fedtune.cli import main
from fedtune.common.serving.export import export_run
from fedtune.common.training.config import load_config
from fedtune.simulations.run import read_scenario, simulate

pytestmark = pytest.mark.slow

STOCK = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
assert "fedtune" not in sys.modules
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d).eval()
msgs = [{"role": "user", "content": "Write a headline for this news article.\\n\\nShares in the carmaker rose."}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=8, do_sample=False)
text = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
print("GENERATED:" + text)
assert "fedtune" not in sys.modules
"""


def test_llm_scenario_federates_exports_and_generates(tmp_path, smollm2_dir, capsys):
    # Prepare: the shipped scenario at tiny settings (3 nodes is the least secure aggregation accepts)
    run_dir = tmp_path / "run"
    cfg = load_config({**read_scenario("llm"), "model.path": str(smollm2_dir), "data.max-records": 45, "model.max-length": 64,
                                "model.eval-generate": 2, "model.max-new-tokens": 6, "train.rounds": 1,
                                "train.local-steps": 1, "train.batch-size": 4, "fed.run-dir": str(run_dir),
                       "fed.node-wait-timeout": 300})
    assert cfg.fed.secure_aggregation and cfg.privacy.enabled and cfg.model.task == "causal-lm"
    # Execute: simulate, export
    simulate(cfg, out=lambda s: None, report=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    out = tmp_path / "export"
    record = export_run(run_dir, out)
    # Assert: a securely aggregated DP round, LLM figures for the base and the tuned model, the report table
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["status"] == "ok" and rounds[0]["secure_aggregation"] and rounds[0]["nodes_replied"] == 3
    assert 0 < rounds[0]["epsilon_max"] <= 8.0
    for ev in (summary["initial"]["test"], summary["final"]["test"]):
        assert ev["perplexity"] > 1 and 0.0 <= ev["rouge_l"] <= 1.0 and ev["generated"] == 2
    report = (run_dir / "report.md").read_text()
    assert "base model, zero-shot (round 0)" in report and "ROUGE-L" in report
    assert record["model"]["task"] == "causal-lm"
    # stock transformers, in a process that never imports fedtune, loads the merged export and generates
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", STOCK, str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    generated = proc.stdout.split("GENERATED:", 1)[1].strip()
    assert generated
    # fedtune generate streams the same greedy answer
    prompt = tmp_path / "article.txt"
    prompt.write_text("Write a headline for this news article.\n\nShares in the carmaker rose.", encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--file", str(prompt), "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == generated
    # a prompt given twice is one clear message
    assert main(["generate", "--model", str(out), "hi", "--file", str(prompt)]) == 1
    assert "give the prompt once" in capsys.readouterr().err
