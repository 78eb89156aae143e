"""The model card of an export: Hugging Face format (YAML metadata + Markdown), built from the export record.

Every number comes from the record, which ``common.export.run_record`` reads from the run
directory; nothing here is typed by hand. The YAML metadata is written by huggingface_hub's
``ModelCardData`` (``model-index`` for the evaluation results) plus a ``fedtune`` block with the
privacy figures, so tools can read the guarantee without parsing prose.
"""

from __future__ import annotations

import time

from fedtune.common.formatting import num


def _fmt(x, spec: str = ".4f") -> str:
    whole = isinstance(x, int) and not isinstance(x, bool) and not spec.endswith("d")
    return num(float(x) if whole else x, spec)


def _range(values: list, spec: str) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return format(lo, spec) if lo == hi else f"{format(lo, spec)} to {format(hi, spec)}"


def privacy_summary(record: dict) -> dict:
    """The guarantee in numbers: worst (largest) epsilon and delta over the participating nodes, etc."""
    p = record["privacy"]
    nodes = list((p.get("nodes") or {}).values())
    eps = [n.get("epsilon") for n in nodes if n.get("epsilon") is not None]
    return {
        "dp": bool(p.get("dp")),
        "unit": "one record (text and label) of one node's dataset",
        "epsilon_max": max(eps) if eps else None,
        "epsilon_min": min(eps) if eps else None,
        "delta_max": max((n["delta"] for n in nodes if n.get("delta") is not None), default=None),
        "accountant": p.get("accountant"),
        "max_grad_norm": p.get("max_grad_norm"),
        "noise_multiplier_min": min((n["noise_multiplier"] for n in nodes if n.get("noise_multiplier") is not None),
                                    default=None),
        "sampling": "Poisson" if p.get("poisson_sampling", True) else "fixed-size batches (not covered by "
                    "the accountant's assumption)",
        "nodes": len(nodes),
        "secure_aggregation": bool(p.get("secure_aggregation")),
    }


def _metadata(record: dict) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    m, src, met = record["model"], record["source"], record["metrics"]
    cls = m["task"] == "seq-cls"
    task = "text-classification" if cls else "text-generation"
    dataset = "BBC News" if "BBC" in record["data"]["server_eval"] else "held-out data"
    results = []
    test = met.get("test") or {}
    for key, name in (("accuracy", "accuracy"), ("macro_f1", "f1"), ("loss", "loss"), ("perplexity", "perplexity"),
                      ("rouge_l", "rougeL")):
        if test.get(key) is not None:
            results.append(EvalResult(task_type=task, dataset_type="server-held-out", dataset_name=dataset,
                                      dataset_split="test", metric_type=name, metric_value=test[key],
                                      metric_name="test macro-F1" if key == "macro_f1" else f"test {key}",
                                      metric_config="macro" if key == "macro_f1" else None))
    fed = met.get("federated") or {}
    if fed.get("accuracy") is not None:
        results.append(EvalResult(task_type=task, dataset_type="federated-local-test", dataset_name="nodes' local "
                                  "test splits", dataset_split="test", metric_type="accuracy",
                                  metric_value=fed["accuracy"], metric_name="federated accuracy (weighted mean)"))
    tags = ["fedtune", "federated-learning", "lora", "peft"]
    if record["privacy"].get("dp"):
        tags += ["differential-privacy", "dp-sgd", "opacus"]
    if record["privacy"].get("secure_aggregation"):
        tags.append("secure-aggregation")
    data = ModelCardData(
        base_model=m["base_model"] if m.get("base_model_packaged") else None,
        library_name="transformers", pipeline_tag=task, tags=tags,
        model_name=f"{src['run']}-{src['checkpoint']}", eval_results=results or None,
        fedtune={"source_run": src["run"], "source_round": src["round"], "checkpoint": src["checkpoint"],
                 "labels": m["labels"], "privacy": privacy_summary(record)},
    )
    return data.to_yaml()


def model_card(record: dict) -> str:
    """The README.md of an exported model."""
    return f"---\n{_metadata(record)}\n---\n\n{_body(record)}"


def _parts(record: dict) -> tuple:
    """The record's sections and derived values every part of the card uses."""
    m = record["model"]
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(record.get("created", time.time())))
    return (m, record["lora"], record["training"], record["source"], record["metrics"], record["privacy"],
            privacy_summary(record), m["task"] == "seq-cls", created)


def _body(record: dict) -> str:
    """The card's Markdown body, section by section."""
    return "\n".join(line for part in (_summary_and_model, _privacy_section, _evaluation_section, _limitations_section, _use_section) for line in part(record))


def _summary_and_model(record: dict) -> list[str]:
    """Title, provenance, model and federated training."""
    m, lo, tr, src, met, p, ps, cls, created = _parts(record)
    lines = [
        f"# {src['run']} ({src['checkpoint']})",
        "",
        f"A {'text classifier' if cls else 'causal language model'} fine-tuned with federated learning by "
        f"fedtune: "
        + (f"a classification head on the frozen features of `{m['base_model']}`" if lo.get("head_only") else
           f"LoRA adapters of `{m['base_model']}`")
        + " trained on the private data of "
        f"{tr['nodes_participating']} participating nodes, which never left their premises"
        + (", with differentially private training on every node" if p.get("dp") else "") + ".",
        f"Exported {created} from run `{src['run']}`, {src['checkpoint'].replace('-', ' ')} "
        f"(global model after round {src['round']}; run status: {src['run_status']}; {src['kind']}).",
        "",
        "## Model",
        "",
        f"- Base model: `{m['base_model']}`",
        f"- Task: {m['task']}" + (f"; labels (id order): {', '.join(f'{i}={lab}' for i, lab in enumerate(m['labels']))}"
                                  if cls else ""),
        f"- Input: texts truncated to {m['max_length']} tokens",
        ("- Trained: only the classification head, on the frozen model's "
         + ("normalised mean-pooled" if m.get("pooling") == "mean" else "pooled") + " features (a linear probe); "
         "the encoder is the base model's, unchanged (its LoRA is left at its initial value, which adds nothing)"
         if lo.get("head_only") else
         f"- LoRA: rank {lo['r']}, alpha {lo['alpha']:g}, dropout {lo['dropout']:g}, target modules "
         f"{', '.join(lo['target_modules']) if lo['target_modules'] else 'PEFT default for the architecture'}"
         + ("; FFA-LoRA (A frozen at its shared seeded value, only B and the head trained)" if lo["ffa"] else "")),
        "- Files: this directory is the merged model (the adapter folded into the base weights; load it with "
        "`AutoModelFor" + ("SequenceClassification" if cls else "CausalLM") + ".from_pretrained`"
        + (", `trust_remote_code=True`: its pooling code is in the directory" if m.get("pooling") == "mean" else "")
        + "); `adapter/` "
        "holds the LoRA adapter alone as a PEFT directory; `fedtune-export.json` the provenance and the sha256 of "
        "every file.",
        "",
        "## Federated training",
        "",
        f"- Rounds: {tr['rounds_run']} run up to this checkpoint ({tr['rounds_ok']} successful"
        + (f"; failed: {', '.join(map(str, tr['rounds_failed']))}" if tr["rounds_failed"] else "")
        + f"), {tr['rounds_planned']} planned",
        f"- Participating nodes: {tr['nodes_participating']} (nodes contributing per round: "
        f"{', '.join('-' if n is None else str(n) for n in tr['nodes_per_round'])})",
        f"- Aggregation: {tr['aggregation']} (FedAvg); secure aggregation: "
        + ("**on**: the server received only masked updates and learned only their sum" if p.get("secure_aggregation")
           else "**off**: the server saw each node's (differentially private) update"),
        f"- Local training per round: {tr['optimizer']} lr {tr['lr']:g}, expected batch {tr['batch_size']}, "
        + (f"{tr['local_steps']} steps" if tr["local_steps"] else f"{tr['local_epochs']:g} local epoch(s)"),
    ]
    if tr.get("partitioner"):
        lines.append(f"- Simulation: {tr['num_nodes']} virtual nodes, partitioner {tr['partitioner']}"
                     + (f" (Dirichlet alpha {tr['dirichlet_alpha']:g})" if tr.get("dirichlet_alpha") else ""))
    return lines


def _privacy_section(record: dict) -> list[str]:
    """The privacy guarantee as the ledgers recorded it."""
    m, lo, tr, src, met, p, ps, cls, created = _parts(record)
    lines = []
    lines += ["", "## Privacy guarantee", ""]
    if p.get("dp"):
        lines += [
            f"Each participating node trained with DP-SGD (Opacus): per-sample gradient clipping to L2 norm "
            f"{ps['max_grad_norm']:g}, Gaussian noise, {ps['sampling']} sampling of batches. The guarantee is "
            f"**sample-level (epsilon, delta)-differential privacy for each node's dataset**: for any one record "
            f"(text and label) of a node's data, adding or removing it changes the probability of any outcome of "
            f"everything that node released in this federation (and so of this model) by at most a factor "
            f"e^epsilon, except with probability delta. Everything a node released counts: its DP-SGD steps and "
            f"its noised answers to federated evaluations. Epsilon is accounted with the "
            f"**{ps['accountant']}** accountant and kept in the node's own privacy ledger for its data source, "
            f"which also counts everything released earlier about the same source; the epsilon below is that "
            f"ledger total.",
            "",
            f"- Largest epsilon over the nodes: **{_fmt(ps['epsilon_max'], '.3f')}**, delta "
            f"**{_fmt(ps['delta_max'], '.3g')}**" + (f" (target epsilon of the job: {p['target_epsilon']:g})"
                                                    if p.get("target_epsilon") else ""),
            f"- Nodes: {ps['nodes']}; epsilon {_range([n.get('epsilon') for n in p['nodes'].values()], '.3f')}; "
            f"noise multiplier {_range([n.get('noise_multiplier') for n in p['nodes'].values()], '.4f')}; "
            f"sampling rate {_range([n.get('sample_rate') for n in p['nodes'].values()], '.5f')}; "
            f"DP-SGD steps {_range([n.get('steps') for n in p['nodes'].values()], 'd')}",
            "",
            "| node | epsilon | delta | ceiling | noise multiplier | sampling rate | steps | rounds | "
            "evaluation answers |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, n in p["nodes"].items():
            lines.append(f"| {name} | {_fmt(n.get('epsilon'), '.4f')} | {_fmt(n.get('delta'), '.3g')} | "
                         f"{_fmt(n.get('max_epsilon'), 'g')} | {_fmt(n.get('noise_multiplier'), '.4f')} | "
                         f"{_fmt(n.get('sample_rate'), '.5f')} | {_fmt(n.get('steps'), 'd')} | "
                         f"{len(n.get('rounds') or [])} | {n.get('evaluations', 0)} |")
        if not p.get("nodes_named"):
            lines += ["", "Nodes are shown as numbered participants, not by name (export with `--name-nodes` to name them)."]
        tu = p.get("tuning") or {}
        if (tu.get("privacy") or {}).get("search_epsilon_max") is not None:
            if "trials_run" in tu:
                how = f"{tu['trials_run']} trials, every release of every trial composed"
            else:  # a study of an earlier fedtune (Poisson trials, Papernot & Steinke's bound)
                how = f"{tu.get('trials_planned')} trials"
            lines += ["", f"**This recipe was chosen by a hyperparameter search** (`fedtune tune`: {how}). "
                          f"Including the search, each node's epsilon is at most "
                          f"**{tu['privacy']['search_epsilon_max']:.3f}** (the table above shows each node's total "
                          "when this run ended)."]
    else:
        lines += ["**No differential privacy.** This model was trained without DP-SGD: it carries no formal "
                  "guarantee and may memorize and reveal records of the nodes' data. Do not release it beyond the "
                  "participating organizations."]
    return lines


def _evaluation_section(record: dict) -> list[str]:
    """Server-side and federated evaluation figures."""
    m, lo, tr, src, met, p, ps, cls, created = _parts(record)
    lines = []
    lines += ["", "## Evaluation", ""]
    test, val, fed = met.get("test") or {}, met.get("val") or {}, met.get("federated") or {}
    keys = ("accuracy", "macro_f1", "loss", "n") if cls else ("loss", "perplexity", "rouge_l", "n")
    if test or val:
        lines += [f"On the server's held-out data ({record['data']['server_eval']}):", "",
                  "| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for split, ev in (("test", test), ("validation", val)):
            if ev:
                lines.append(f"| {split} | " + " | ".join(_fmt(ev.get(k), "d" if k == "n" else ".4f")
                                                         for k in keys) + " |")
        audits = (("the server's test split", (met.get("test") or {}).get("fairness")),
                  ("the nodes' own test splits, from their noised per-group answers (estimates)", fed.get("fairness")))
        for where, fair in audits:
            if not fair:
                continue
            lines += ["", f"Fairness audit (by the data's group column, on {where}):", "",
                      "| group | records | accuracy | macro-F1 |", "|---|---|---|---|"]
            lines += [f"| {g} | {v['n']} | {_fmt(v['accuracy'])} | {_fmt(v['macro_f1'])} |"
                      for g, v in fair["groups"].items()]
            lines += ["", f"Largest gaps: accuracy {_fmt(fair['accuracy_gap'])}, macro-F1 {_fmt(fair['macro_f1_gap'])}; "
                          f"demographic-parity difference {_fmt(fair['demographic_parity_difference'])}, equalized-odds "
                          f"difference {_fmt(fair['equalized_odds_difference'])} (fairlearn)."]
        mb = met.get("majority_baseline")
        if mb:
            lines += ["", f"Always answering the most common label ({mb['label']!r}) scores accuracy "
                          f"{_fmt(mb['accuracy'])} and macro-F1 {_fmt(mb['macro_f1'])} on this test split: the floor "
                          "this model is measured against."]
    else:
        lines.append("The server evaluated no held-out data in this run.")
    per_class = met.get("per_class")
    if per_class:
        lines += ["", "Per class (test):", "", "| label | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for lab, c in per_class.items():
            lines.append(f"| {lab} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    elif cls:
        lines += ["", "Per-class figures were not recorded for this checkpoint."]
    if fed:
        lines += ["", f"On the nodes' own local test data (federated evaluation, {fed.get('nodes')} nodes; each node "
                  "answered with Gaussian noise on its counts, so these are estimates): pooled accuracy "
                  f"{_fmt(fed.get('accuracy'))}" + (f", loss {_fmt(fed.get('loss'))}" if fed.get("loss") is not None
                                                   else "")
                  + f"; worst node accuracy {_fmt(fed.get('worst_accuracy'))}."]
    return lines


def _limitations_section(record: dict) -> list[str]:
    """What the guarantee and the figures do not cover."""
    m, lo, tr, src, met, p, ps, cls, created = _parts(record)
    test, fed = met.get("test") or {}, met.get("federated") or {}
    lines = []
    lines += ["", "## Known limitations", ""]
    lim = []
    if p.get("dp"):
        lim += [
            "The guarantee is per record, not per person: someone with k records in a node's data is protected "
            "only at k times epsilon (group privacy, with a larger delta).",
            "It covers what nodes released: training updates and noised evaluation answers. The server's "
            "held-out figures in this card are computed on the server's own data, without noise.",
            "Each node's epsilon holds for that node's dataset; the nodes' guarantees do not add up to one "
            "guarantee over all data, and a node's ledger total includes any earlier training on the same data.",
            "Choices made by looking at private data (hyperparameters, early stopping on nodes' metrics) are not "
            "accounted.",
        ]
    lim += [
        "Secure aggregation hides individual updates from the server, not from the released model: the model "
        "itself is protected only by differential privacy." if p.get("secure_aggregation") else
        "Without secure aggregation the server saw every node's individual update.",
        f"Texts longer than {m['max_length']} tokens are truncated; the base model's language coverage and biases "
        "carry over.",
    ]
    if fed.get("worst_accuracy") is not None and fed.get("accuracy") is not None:
        lim.append(f"Performance varies between organizations: worst node accuracy "
                   f"{fed['worst_accuracy']:.4f} vs {fed['accuracy']:.4f} on average.")
    if test.get("n") is not None:
        lim.append(f"The held-out test set is small (n={test['n']}); per-class figures on few examples are noisy.")
    lim.append("Check it on your own data before use: `fedtune drift` compares it with these figures locally.")
    lines += [f"- {x}" for x in lim]
    return lines


def _use_section(record: dict) -> list[str]:
    """How to load the model."""
    m, lo, tr, src, met, p, ps, cls, created = _parts(record)
    lines = []
    lines += ["", "## Use", "", "```python",
              "from transformers import AutoModelForSequenceClassification, AutoTokenizer" if cls else
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(\"THIS_DIR\")",
              ("model = AutoModelForSequenceClassification.from_pretrained(\"THIS_DIR\"" +
               (", trust_remote_code=True)" if m.get("pooling") == "mean" else ")") if cls else
               "model = AutoModelForCausalLM.from_pretrained(\"THIS_DIR\")"), "```", ""]
    if m.get("pooling") == "mean":
        lines += ["The head reads the normalised mean of the last hidden states (`model.pooling=mean`), which stock "
                  "BERT classes do not do: `fedtune_pooling.py` in this directory holds that code (torch and "
                  "transformers only), so transformers loads the model only with `trust_remote_code=True` and refuses without "
                  "it rather than compute wrong answers. fedtune itself never runs that file.", ""]
    lines += ["or `fedtune predict --model THIS_DIR texts.txt` (see docs/serving.md).", ""]
    return lines
