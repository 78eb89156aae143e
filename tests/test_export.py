"""Export of a real federated run: merged model == base + adapter, stock loading without fedtune,
a model card whose numbers are the run directory's, and clear refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fedtune.cli import main
from fedtune.common.serving.export import EXPORT_FILE, export_run, read_record
from fedtune.common.training.assets import default_model_dir
from helpers import LORA_RECIPE

TEXTS = ["Shares in the bank fell after it reported lower profits.",
         "The striker scored twice as the club won the cup final.",
         "The minister announced a new election date.",
         "A new smartphone chip promises longer battery life."]
# Float32 matrix products summed in a different order (W x + B A x vs (W + B A) x) differ by rounding only.
LOGIT_TOLERANCE = 1e-4

STOCK_LOADER = r"""
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
d, max_length, texts, trust = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] == "trust"
tok = AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=trust)
model = AutoModelForSequenceClassification.from_pretrained(d, local_files_only=True, trust_remote_code=trust).eval()
with torch.no_grad():
    logits = model(**tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")).logits
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("fedtune", "peft", "opacus", "flwr"))
print(json.dumps({"logits": logits.tolist(), "id2label": model.config.id2label, "leaked": leaked}))
"""


def _stock_logits(directory: Path, max_length: int, *, trust_remote_code: bool = False) -> dict:
    proc = subprocess.run([sys.executable, "-c", STOCK_LOADER, str(directory), str(max_length), json.dumps(TEXTS),
                           "trust" if trust_remote_code else "no"],
                          capture_output=True, text=True, cwd=directory, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_merged_export_equals_base_plus_adapter_and_loads_without_fedtune(tiny_run, tiny_export):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    record = read_record(tiny_export)
    labels, max_length = record["model"]["labels"], record["model"]["max_length"]
    # Reference: the packaged base model + the run's final adapter, through stock PEFT (unmerged)
    base = AutoModelForSequenceClassification.from_pretrained(str(default_model_dir()), num_labels=len(labels))
    peft_model = PeftModel.from_pretrained(base, str(tiny_run / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    with torch.no_grad():
        ref = peft_model(**tok(TEXTS, padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")).logits
    # Execute: load the export with stock transformers in a fresh interpreter that never imports fedtune
    out = _stock_logits(tiny_export, max_length)
    # Assert
    assert out["leaked"] == []
    got = torch.tensor(out["logits"])
    assert got.shape == (len(TEXTS), len(labels))
    assert torch.max(torch.abs(got - ref)).item() < LOGIT_TOLERANCE
    assert out["id2label"] == {str(i): lab for i, lab in enumerate(labels)}
    # the merge really folded LoRA into the encoder: a targeted weight moved away from the base model's
    from safetensors.torch import load_file

    merged = load_file(str(tiny_export / "model.safetensors"))
    original = load_file(str(default_model_dir() / "model.safetensors"))
    key = next(k for k in merged if k.endswith("attention.self.query.weight"))
    orig_key = next(k for k in original if k.endswith(key.split("bert.", 1)[-1]))
    assert not torch.equal(merged[key], original[orig_key])
    # the adapter alone is a standard PEFT directory equal to the run's
    assert (tiny_export / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tiny_run / "adapter" / "adapter_model.safetensors").read_bytes()


def test_model_card_numbers_are_the_run_directorys(tiny_run, tiny_export):
    from huggingface_hub import ModelCard

    summary = json.loads((tiny_run / "summary.json").read_text())
    rounds = [json.loads(x) for x in (tiny_run / "rounds.jsonl").read_text().splitlines()]
    card = ModelCard.load(tiny_export / "README.md")
    meta = card.data.to_dict()
    # evaluation results (model-index) are the server's final test figures and the last federated evaluation
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    test = summary["final"]["test"]
    assert results[("server-held-out", "accuracy")] == test["accuracy"]
    assert results[("server-held-out", "f1")] == test["macro_f1"]
    assert results[("server-held-out", "loss")] == test["loss"]
    assert results[("federated-local-test", "accuracy")] == summary["federated_eval"]["accuracy"]
    # the privacy block is the nodes' reported figures
    nodes = summary["privacy"]["nodes"]
    priv = meta["fedtune"]["privacy"]
    assert priv["epsilon_max"] == max(n["epsilon"] for n in nodes.values())
    assert priv["delta_max"] == max(n["delta"] for n in nodes.values())
    assert priv["noise_multiplier_min"] == min(n["noise_multiplier"] for n in nodes.values())
    assert priv["accountant"] == summary["privacy"]["accountant"] == "pld"
    assert priv["max_grad_norm"] == summary["privacy"]["max_grad_norm"]
    assert priv["nodes"] == len(nodes) == 3 and priv["secure_aggregation"] is True and priv["dp"] is True
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["fedtune"]["labels"] == ["business", "entertainment", "politics", "sport", "tech"]
    assert meta["fedtune"]["source_round"] == rounds[-1]["round"] == 2
    # the text states them too
    body = card.text
    assert "sample-level (epsilon, delta)-differential privacy for each node's dataset" in body
    assert f"**{priv['epsilon_max']:.3f}**" in body and "Poisson" in body and "**pld**" in body
    for n in nodes.values():
        assert f"| {n['epsilon']:.4f} | {n['delta']:.3g} | {n['max_epsilon']:g} | {n['noise_multiplier']:.4f} | " \
               f"{n['sample_rate']:.5f} | {n['steps']} | {len(n['rounds'])} | {n['evaluations']} |" in body
    for lab, c in summary["final_per_class"].items():
        assert f"| {lab} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |" in body
    assert f"| test | {test['accuracy']:.4f} | {test['macro_f1']:.4f} | {test['loss']:.4f} | {test['n']} |" in body
    assert "Participating nodes: 3" in body and "secure aggregation: **on**" in body
    assert "## Known limitations" in body and "per record, not per person" in body
    # identities are not disclosed unless asked
    assert "node-0" not in card.content and "| participant 1 |" in body and "node 1" not in body
    # the card says what this run trained (LoRA here)
    assert "- LoRA: rank" in body and "only the classification head" not in body


def test_the_card_of_a_head_only_mean_pooled_run_says_what_it_trained_and_how_to_load_it(tiny_run):
    """A head-only run trains no LoRA: its card says so (before: "LoRA adapters ... trained", "FFA-LoRA ... only B
    and the head trained") and its load line carries trust_remote_code for the mean pooling."""
    from fedtune.common.serving.export import run_record
    from fedtune.common.serving.modelcard import model_card

    record = run_record(tiny_run)
    record["lora"] = {**record["lora"], "head_only": True, "ffa": True}
    record["model"] = {**record["model"], "pooling": "mean"}
    card = model_card(record)
    assert "a classification head on the frozen features of" in card and "LoRA adapters of" not in card
    assert "only the classification head, on the frozen model's normalised mean-pooled features" in card
    assert "FFA-LoRA" not in card and "- LoRA: rank" not in card
    assert card.count("trust_remote_code=True") >= 2  # the files line and the load snippet


def test_round_checkpoint_export_uses_that_rounds_figures(tiny_run, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "round1"
    record = export_run(tiny_run, out, round=1, name_nodes=True)
    r1 = json.loads((tiny_run / "rounds.jsonl").read_text().splitlines()[0])
    assert record["source"]["checkpoint"] == "round-1" and record["metrics"]["test"] == r1["server_eval"]["test"]
    assert record["metrics"]["per_class"] == r1["server_per_class"] and record["metrics"]["per_class"]
    # a node's epsilon as of round 1 is its ledger after its last release in round 1: the evaluation answer
    eps = {name: max(m["epsilon"], r1["federated_eval"]["per_node"][name]["epsilon"])
           for name, m in r1["per_node"].items()}
    assert {name: p["epsilon"] for name, p in record["privacy"]["nodes"].items()} == eps
    assert all(p["steps"] == r1["per_node"][name]["steps"] for name, p in record["privacy"]["nodes"].items())
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict()["fedtune"]["privacy"]["epsilon_max"] == r1["epsilon_max"]
    assert "node-0" in card.text  # --name-nodes
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tiny_run / "checkpoints" / "round-1" / "adapter_model.safetensors").read_bytes()


def _fails_cleanly(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("fedtune: error: ") and "fix:" in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_export_refusals_name_the_problem_and_leave_nothing(tiny_run, tiny_export, tmp_path, capsys):
    out = tmp_path / "out"
    _fails_cleanly(capsys, ["export", str(tiny_run), "--out", str(out), "--round", "7"], "no round 7",
                   "rounds with a checkpoint: 1, 2")
    _fails_cleanly(capsys, ["export", str(tmp_path), "--out", str(out)], "not a readable run directory")
    _fails_cleanly(capsys, ["export", str(tiny_run), "--out", str(tiny_export)], "already exists")
    # an unfinished run (no final adapter yet), a failed round, and a corrupted adapter
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken, ignore=shutil.ignore_patterns("nodes"))
    shutil.rmtree(broken / "adapter")
    _fails_cleanly(capsys, ["export", str(broken), "--out", str(out)], "has no final adapter yet", "--round K")
    lines = (broken / "rounds.jsonl").read_text().splitlines()
    first = json.loads(lines[0]) | {"status": "failed", "reason": "too many nodes dropped out"}
    (broken / "rounds.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    _fails_cleanly(capsys, ["export", str(broken), "--out", str(out), "--round", "1"], "round 1", "failed",
                   "too many nodes dropped out")
    ckpt = broken / "checkpoints" / "round-2" / "adapter_model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    _fails_cleanly(capsys, ["export", str(broken), "--out", str(out), "--round", "2"], "corrupt")
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_export_record_hashes_every_file(tiny_export):
    import hashlib

    record = read_record(tiny_export)
    files = {p.relative_to(tiny_export).as_posix() for p in tiny_export.rglob("*") if p.is_file()}
    assert set(record["files"]) == files - {EXPORT_FILE}
    for name, f in record["files"].items():
        assert hashlib.sha256((tiny_export / name).read_bytes()).hexdigest() == f["sha256"]
    assert record["weights_sha256"] == record["files"]["model.safetensors"]["sha256"]


@pytest.mark.slow
def test_export_cli_prints_the_guarantee(tiny_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", "export", str(tiny_run), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "sample-level DP per node dataset, epsilon <=" in proc.stdout and "secure aggregation on" in proc.stdout
    assert "exported in" in proc.stderr and (tmp_path / "x" / "README.md").is_file()


@pytest.mark.slow
def test_causal_lm_run_exports_and_is_not_served_as_a_classifier(tiny_gpt2_dir, tmp_path, capsys):
    from fedtune.common.training.config import load_config
    from fedtune.simulations.run import simulate
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    simulate(load_config({"model.path": str(tiny_gpt2_dir), "model.task": "causal-lm", "model.max-length": 16,
                          "data.max-records": 120, "train.local-steps": 2, "train.batch-size": 8,
                          "sim.partitioner": "iid", "fed.num-nodes": 3, "fed.min-nodes": 3, "train.rounds": 1,
                          "fed.run-dir": str(run_dir), "fed.node-wait-timeout": 120,
                          # trained on a bf16 base (forced here: no GPU); the export is still exact, in fp32
                          "train.precision": "bf16"}), out=lambda s: None,
             report=False)
    out = tmp_path / "export"
    record = export_run(run_dir, out)
    summary = json.loads((run_dir / "summary.json").read_text())
    # merged == base + adapter, through stock classes
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir))
    ref = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()(input_ids=ids).logits
    stock = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert all(p.dtype == torch.float32 for p in stock.parameters())
    got = stock(input_ids=ids).logits
    assert torch.max(torch.abs(got - ref)).item() < LOGIT_TOLERANCE
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-generation" and record["model"]["labels"] == []
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["perplexity"] == summary["final"]["test"]["perplexity"]
    assert "causal language model" in card.text and "AutoModelForCausalLM" in card.text
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    assert main(["predict", str(texts), "--model", str(out)]) == 1
    assert "only classifiers label texts" in capsys.readouterr().err


@pytest.mark.slow
def test_a_mean_pooled_run_exports_loads_with_its_code_and_is_never_silently_wrong(tmp_path):
    """model.pooling=mean (LoRA trained too): the export equals base + adapter with the head on the normalised
    mean of the last hidden states, computed here by hand; stock transformers loads it with
    trust_remote_code in a process without fedtune, refuses it without, and fedtune serves it without
    running the directory's code."""
    from fedtune.common.serving.inference import Classifier
    from fedtune.common.training.config import load_config
    from fedtune.simulations.run import simulate
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, out = tmp_path / "run", tmp_path / "export"
    simulate(load_config({**LORA_RECIPE, "data.max-records": 240, "model.max-length": 16, "train.local-steps": 2,
                          "train.batch-size": 8, "sim.partitioner": "iid", "fed.num-nodes": 3, "fed.min-nodes": 3,
                          "train.rounds": 1, "fed.run-dir": str(run_dir), "fed.node-wait-timeout": 120,
                          "model.pooling": "mean"}), out=lambda s: None, report=False)
    record = export_run(run_dir, out)
    labels, max_length = record["model"]["labels"], record["model"]["max_length"]
    # Reference, without fedtune's pooling code: stock PEFT, then the mean of the real tokens' states, normalised
    base = AutoModelForSequenceClassification.from_pretrained(str(default_model_dir()), num_labels=len(labels))
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    batch = tok(TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = peft_model.base_model.model.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        ref = peft_model.base_model.model.classifier(pooled)
        stock_pooler = peft_model(**batch).logits
    assert torch.max(torch.abs(ref - stock_pooler)).item() > 1e-3  # the two poolings really differ
    got = _stock_logits(out, max_length, trust_remote_code=True)
    assert got["leaked"] == []
    assert torch.max(torch.abs(torch.tensor(got["logits"]) - ref)).item() < LOGIT_TOLERANCE
    # without trust_remote_code stock transformers refuses: it never loads the stock pooler silently
    proc = subprocess.run([sys.executable, "-c", STOCK_LOADER, str(out), str(max_length), json.dumps(TEXTS), "no"],
                          capture_output=True, text=True, cwd=out, timeout=300, check=False)
    assert proc.returncode != 0 and "trust_remote_code" in proc.stderr
    # fedtune serves it (applying its own installed pooling, not the directory's code)
    served = torch.tensor(Classifier(out).predict_proba(TEXTS))
    assert torch.max(torch.abs(served - torch.softmax(ref, -1))).item() < LOGIT_TOLERANCE


STOCK_DEFAULTS = r"""
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
d, text = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
model = AutoModelForSequenceClassification.from_pretrained(d, local_files_only=True).eval()
enc = tok([text], truncation=True, return_tensors="pt")  # no max_length: what the export's tokenizer says
with torch.no_grad():
    probs = torch.softmax(model(**enc).logits, -1)[0].tolist()
top = pipeline("text-classification", model=model, tokenizer=tok, top_k=None)([text], truncation=True)[0]
print(json.dumps({"tokens": enc["input_ids"].shape[1], "probs": probs,
                  "pipeline": {r["label"]: r["score"] for r in top}}))
"""


def test_the_export_truncates_a_long_text_where_the_model_was_trained_like_fedtune_predict(tiny_export):
    """Stock transformers with the export's own tokenizer defaults answers a text longer than the trained length
    as `fedtune predict` does (before: the export said model_max_length 512, the model was trained at 16 here,
    and a long text got a different answer)."""
    from fedtune.common.serving.inference import Classifier

    max_length = read_record(tiny_export)["model"]["max_length"]
    long_text = " ".join(TEXTS * 20)
    proc = subprocess.run([sys.executable, "-c", STOCK_DEFAULTS, str(tiny_export), long_text],
                          capture_output=True, text=True, cwd=tiny_export, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tokens"] == max_length
    clf = Classifier(tiny_export)
    served = clf.predict_proba([long_text])[0]
    assert max(abs(a - b) for a, b in zip(got["probs"], served, strict=True)) < 1e-5
    assert max(abs(got["pipeline"][lab] - p) for lab, p in zip(clf.labels, served, strict=True)) < 1e-5
