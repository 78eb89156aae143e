"""One validated job configuration, built from flat ``key=value`` settings.

Keys are ``section.field`` with dashes (``lora.r``, ``privacy.target-epsilon``),
the style of Flower's ``run_config``. Defaults live only in the dataclasses
below; :func:`load_config` parses values once (strings from a command line or
typed values from Flower), rejects unknown keys and reports every problem at
once. Below this edge, code receives plain, already-valid values.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedtune.common.errors import ConfigError
from fedtune.common.operations import tracking
from fedtune.common.secagg.limits import CLIP_RANGE, MIN_COHORT, effective_max_weight, max_weight_fitting
from fedtune.common.secagg.limits import WEIGHTINGS as AGGREGATIONS
from fedtune.common.training.imbalance import WEIGHTINGS

TASKS = ("seq-cls", "causal-lm")
ACCOUNTANTS = ("pld", "rdp")  # gdp and prv are not offered: GDP's CLT approximation can under-count
GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "ew")
PRECISIONS = ("auto", "fp32", "bf16")
POOLINGS = ("cls", "mean")
OPTIMIZERS = ("adamw", "sgd")
MAX_ROUNDS = 10_000
MAX_PLANNED_STEPS = 200_000  # DP-SGD steps one job may plan on a node (accounting more takes minutes and GBs)


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f("", "local directory of a transformers model; empty = packaged all-MiniLM-L6-v2")
    task: str = _f("seq-cls", f"one of {', '.join(TASKS)}")
    max_length: int = _f(64, "tokens kept per text (longer texts are truncated)")
    max_new_tokens: int = _f(32, "instruction tuning: most tokens generated per answer (evaluation, fedtune generate)")
    eval_generate: int = _f(16, "instruction tuning: held-out prompts the server answers at each evaluation to "
                            "score ROUGE-L against the reference responses (0 = none)")
    pooling: str = _f("mean", "what the classification head reads: cls (the model's own pooler over the first token, "
                      "as stock transformers does) or mean (the L2-normalised mean of the last hidden states over "
                      "the text's tokens: what sentence-embedding models such as the packaged MiniLM were trained "
                      "for; its export needs trust_remote_code outside fedtune); seq-cls encoders with a pooler")

    def problems(self) -> list[str]:
        out = []
        if self.task not in TASKS:
            out.append(f"model.task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        if self.pooling not in POOLINGS:
            out.append(f"model.pooling: expected one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        elif self.pooling != "cls" and self.task != "seq-cls":
            out.append(f"model.pooling={self.pooling}: only a seq-cls model has a head that reads pooled features; "
                       "set model.pooling=cls for model.task=causal-lm")
        if not 8 <= self.max_length <= 8192:
            out.append(f"model.max-length: expected 8..8192, got {self.max_length}")
        if not 1 <= self.max_new_tokens <= 4096:
            out.append(f"model.max-new-tokens: expected 1..4096, got {self.max_new_tokens}")
        if self.eval_generate < 0:
            out.append(f"model.eval-generate: expected >= 0, got {self.eval_generate}")
        return out


def adapter_description(*, r: int, ffa: bool, head_only: bool = False) -> str:
    """"classification head only", "FFA-LoRA r=8" or "LoRA r=8" (also for stored settings)."""
    if head_only:
        return "classification head only (frozen model features)"
    return f"{'FFA-LoRA' if ffa else 'LoRA'} r={r}"


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(8, "LoRA rank")
    alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = _f(0.0, "dropout on the LoRA input")
    target_modules: str = _f("", "comma-separated module names; empty = PEFT's default for the architecture")
    ffa: bool = _f(True, "FFA-LoRA: freeze A (same on every node from lora.seed), train and exchange only B and the "
                   "head")
    head_only: bool = _f(True, "train and exchange only the classification head on the frozen model's features (a "
                         "DP linear probe: ~50x fewer parameters to noise; seq-cls only). To adapt "
                         "the encoder too: lora.head-only=false train.lr=2 train.local-epochs=1 train.batch-size=32")
    seed: int = _f(0, "shared seed for the initial adapter (A matrices and new head); equal on every node")

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.r <= 1024:
            out.append(f"lora.r: expected 1..1024, got {self.r}")
        if self.alpha <= 0:
            out.append(f"lora.alpha: expected > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"lora.dropout: expected 0 <= dropout < 1, got {self.dropout}")
        return out

    def describe(self) -> str:
        """What is trained, in words: for progress lines, reports and model cards."""
        return adapter_description(r=self.r, ffa=self.ffa, head_only=self.head_only)

    @property
    def target_module_list(self) -> list[str] | None:
        names = [n.strip() for n in self.target_modules.split(",") if n.strip()]
        return names or None


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = _f(True, "train with DP-SGD (Opacus); off weakens privacy and is warned about")
    target_epsilon: float = _f(8.0, "epsilon this job may spend on a node's data over all its rounds")
    delta: float = _f(0.0, "delta of fedtune local / simulated nodes (0 = 1e-5); a deployed node uses its own "
                           "node config's delta; must be <= 1/N for a source of N records")
    noise_multiplier: float = _f(0.0, "Gaussian noise std / clip norm; 0 = calibrate from target-epsilon")
    max_grad_norm: float = _f(0.5, "per-sample gradient clipping norm")
    accountant: str = _f("pld", f"accountant of fedtune local / simulated nodes, one of {', '.join(ACCOUNTANTS)} "
                                "(pld: Google dp-accounting, near-exact); a deployed node uses its own")
    grad_sample_mode: str = _f("hooks", f"Opacus per-sample gradient mode, one of {', '.join(GRAD_SAMPLE_MODES)}")
    poisson_sampling: bool = _f(True, "Poisson-sample batches; always on (the only sampling that is accounted)")
    eval_budget: float = _f(0.1, "share of the job's epsilon for noised federated-evaluation answers "
                                 "(0 = nodes answer no federated evaluation)")

    def problems(self) -> list[str]:
        out = []
        if self.target_epsilon <= 0 or not math.isfinite(self.target_epsilon):
            out.append(f"privacy.target-epsilon: expected a finite number > 0, got {self.target_epsilon}")
        if not 0.0 <= self.delta <= 1e-3:
            out.append(f"privacy.delta: expected 0 <= delta <= 1e-3 (0 = 1e-5; it must stay below 1/N), "
                       f"got {self.delta}")
        if not self.poisson_sampling:
            out.append("privacy.poisson-sampling=false is not supported: only Poisson-sampled batches are covered by "
                       "the privacy accounting (a shuffled loader would be charged an epsilon it does not have); "
                       "remove the setting")
        if not 0.0 <= self.eval_budget < 1.0:
            out.append(f"privacy.eval-budget: expected 0 <= share < 1, got {self.eval_budget}")
        if self.noise_multiplier < 0:
            out.append(f"privacy.noise-multiplier: expected >= 0, got {self.noise_multiplier}")
        if self.max_grad_norm <= 0:
            out.append(f"privacy.max-grad-norm: expected > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            out.append(f"privacy.accountant: expected one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            out.append(
                f"privacy.grad-sample-mode: expected one of {', '.join(GRAD_SAMPLE_MODES)}, "
                f"got {self.grad_sample_mode!r}"
            )
        return out


@dataclass(frozen=True)
class DataConfig:
    path: str = _f("", "CSV, JSONL or Parquet file of this node's records; empty = packaged BBC News")
    text_column: str = _f("text", "column holding the text")
    label_column: str = _f("label", "column holding the label (seq-cls only)")
    response_column: str = _f("", "causal-lm instruction tuning: column holding the response to the text-column's "
                              "prompt (the loss counts response tokens only); empty = plain text")
    messages_column: str = _f("", "causal-lm instruction tuning from chat records (JSONL): column holding a list of "
                              "{role, content} messages whose last one (the assistant's) is the response")
    labels: str = _f("", "comma-separated label set, in order; required for your own files, same on every node")
    val_fraction: float = _f(0.1, "share of records held out for validation")
    test_fraction: float = _f(0.2, "share of records held out for test")
    seed: int = _f(0, "seed of the train/validation/test split")
    max_records: int = _f(0, "use exactly this many records of packaged or simulated data (0 = all); for quick "
                          "trials (a node's own file refuses it: use data.subsample)")
    subsample: float = _f(1.0, "keep each record with this probability, decided by a keyed hash of its own text "
                          "(adding or removing a record never moves another); for quick trials on your own data")
    group_column: str = _f("", "column naming each record's group for the fairness audit of the server's held-out "
                           "data (per-group accuracy and F1, parity and equalized-odds gaps); empty = no audit")

    def problems(self) -> list[str]:
        out = []
        for name, v in (("val-fraction", self.val_fraction), ("test-fraction", self.test_fraction)):
            if not 0.0 <= v < 1.0:
                out.append(f"data.{name}: expected 0 <= fraction < 1, got {v}")
        if self.val_fraction + self.test_fraction >= 0.9:
            out.append(
                f"data.val-fraction + data.test-fraction: expected < 0.9, got "
                f"{self.val_fraction + self.test_fraction:.2f}"
            )
        if self.max_records < 0:
            out.append(f"data.max-records: expected >= 0, got {self.max_records}")
        if not 0.0 < self.subsample <= 1.0:
            out.append(f"data.subsample: expected 0 < fraction <= 1, got {self.subsample}")
        return out

    @property
    def label_list(self) -> list[str]:
        return [s.strip() for s in self.labels.split(",") if s.strip()]


@dataclass(frozen=True)
class TrainConfig:
    rounds: int = _f(6, "training rounds planned for this job (noise is calibrated over all of them)")
    local_epochs: float = _f(3.0, "passes over the node's training records per round")
    local_steps: int = _f(0, "optimizer steps per round; 0 = local-epochs x (records / batch-size)")
    batch_size: int = _f(128, "expected batch size (Poisson sampling varies it)")
    max_physical_batch_size: int = _f(0, "DP: process Poisson batches in chunks of at most this many records "
                                      "(memory), one optimizer step per logical batch, same accounting; 0 = whole")
    eval_batch_size: int = _f(64, "batch size for evaluation")
    optimizer: str = _f("sgd", f"one of {', '.join(OPTIMIZERS)}")
    lr: float = _f(20.0, "learning rate (20 suits SGD on the head alone)")
    weight_decay: float = _f(0.0, "weight decay")
    seed: int = _f(0, "seed of data order and dropout (DP noise always uses fresh OS entropy)")
    threads: int = _f(0, "torch CPU threads; 0 = torch's default")
    device: str = _f("auto", "where training, evaluation and inference run: auto (a CUDA GPU when torch sees one, "
                     "else the CPU), cpu, cuda or cuda:N")
    precision: str = _f("auto", "dtype of the frozen base model's weights: auto (bf16 on a CUDA GPU that supports it, "
                        "else fp32), fp32 or bf16; LoRA, the head, gradients, clipping and noise stay fp32")
    cache_features: bool = _f(True, "head-only recipes: compute the frozen encoder's features of each record once "
                              "per job and train and evaluate the head on them (same DP mechanism, much faster)")
    class_weighting: str = _f("auto", "class-weighted loss from the labels of the server's held-out data: auto "
                              "(only when labels are skewed), balanced, none")

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.rounds <= MAX_ROUNDS:
            out.append(f"train.rounds: expected 1..{MAX_ROUNDS:,}, got {self.rounds}")
        if not 0 < self.local_epochs <= 1000:
            out.append(f"train.local-epochs: expected > 0 and <= 1000, got {self.local_epochs}")
        if not 0 <= self.local_steps <= MAX_PLANNED_STEPS:
            out.append(f"train.local-steps: expected 0..{MAX_PLANNED_STEPS:,}, got {self.local_steps}")
        if self.batch_size < 1:
            out.append(f"train.batch-size: expected >= 1, got {self.batch_size}")
        if self.max_physical_batch_size < 0:
            out.append(f"train.max-physical-batch-size: expected >= 0, got {self.max_physical_batch_size}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            out.append(f"train.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision not in PRECISIONS:
            out.append(f"train.precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.eval_batch_size < 1:
            out.append(f"train.eval-batch-size: expected >= 1, got {self.eval_batch_size}")
        if self.optimizer not in OPTIMIZERS:
            out.append(f"train.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not 0 < self.lr <= 100:
            out.append(f"train.lr: expected 0 < lr <= 100, got {self.lr}")
        if self.threads < 0:
            out.append(f"train.threads: expected >= 0, got {self.threads}")
        if self.class_weighting not in WEIGHTINGS:
            out.append(f"train.class-weighting: expected one of {', '.join(WEIGHTINGS)}, got {self.class_weighting!r}")
        return out


PARTITIONERS = ("iid", "dirichlet", "label")
METRICS = ("accuracy", "macro_f1", "loss")


@dataclass(frozen=True)
class FedConfig:
    num_nodes: int = _f(5, "nodes expected (simulation: virtual nodes started)")
    fraction_train: float = _f(1.0, "share of connected nodes asked to train each round")
    min_nodes: int = _f(3, "fewest successful replies for a round to count (else it fails, model unchanged); "
                           "at least 3 with secure aggregation")
    aggregation: str = _f("weighted", f"FedAvg weights: {', '.join(AGGREGATIONS)} (weighted = by training records)")
    server_eval: bool = _f(True, "evaluate the global adapter on the server's held-out split every round")
    fraction_evaluate: float = _f(1.0, "share of nodes asked to evaluate the global adapter each round (0 = none)")
    early_stop_patience: int = _f(0, "stop after this many rounds without validation improvement (0 = never)")
    early_stop_metric: str = _f("accuracy", f"validation metric for early stopping: {', '.join(METRICS)}")
    round_timeout: float = _f(900.0, "seconds to wait for replies in a round; late nodes count as dropped")
    node_wait_timeout: float = _f(300.0, "seconds to wait for enough nodes to connect before failing the run")
    secure_aggregation: bool = _f(True, "nodes send only masked updates; the server learns only their sum")
    secagg_clip: float = _f(0.0, "secure aggregation: each update value is clipped to [-clip, clip] before "
                            "quantizing; 0 = auto (1 for LoRA updates, 10 for a head trained alone, which moves more)")
    secagg_max_weight: int = _f(100000, "secure aggregation: largest per-node FedAvg weight (records, rounded up "
                                        "to whole batches)")
    secagg_threshold: float = _f(0.5, "secure aggregation: Shamir threshold as a share of a node's k neighbours, "
                                      "t = floor(share x k) + 1; at least 0.5 (t must be a strict majority)")
    secagg_degree: int = _f(0, "secure aggregation: neighbours per node (0 = complete graph up to ~20 nodes, "
                               "then O(log n)); at least 2")
    run_dir: str = _f("", "run directory the server writes; empty = runs/<time>")
    resume: bool = _f(False, "continue the run in fed.run-dir from its last completed round")
    tracking: str = _f("", "log the run's settings, per-round figures, per-node epsilon, report and final adapter to "
                       "experiment trackers: mlflow, tensorboard or mlflow,tensorboard; empty = off; needs the "
                       "tracking extra (pip install -e \".[tracking]\")")
    tracking_uri: str = _f("", "MLflow tracking URI (sqlite:///PATH.db, http://HOST:5000, ...); empty = "
                           "sqlite:///<the run directory's parent>/mlflow.db, artifacts beside it in mlartifacts/")
    tracking_experiment: str = _f("", "MLflow experiment name; empty = fedtune (fedtune tune: the study's name; "
                                  "fedtune baselines / demo: baselines <run directory name>)")

    def problems(self) -> list[str]:
        out = []
        if self.num_nodes < 1:
            out.append(f"fed.num-nodes: expected >= 1, got {self.num_nodes}")
        if not 0 < self.fraction_train <= 1:
            out.append(f"fed.fraction-train: expected 0 < fraction <= 1, got {self.fraction_train}")
        if not 0 <= self.fraction_evaluate <= 1:
            out.append(f"fed.fraction-evaluate: expected 0 <= fraction <= 1, got {self.fraction_evaluate}")
        if self.min_nodes < 1:
            out.append(f"fed.min-nodes: expected >= 1, got {self.min_nodes}")
        if self.min_nodes > self.num_nodes:
            out.append(f"fed.min-nodes: {self.min_nodes} is more than fed.num-nodes={self.num_nodes}")
        if self.aggregation not in AGGREGATIONS:
            out.append(f"fed.aggregation: expected one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.early_stop_metric not in METRICS:
            out.append(f"fed.early-stop-metric: expected one of {', '.join(METRICS)}, got {self.early_stop_metric!r}")
        if self.early_stop_patience < 0:
            out.append(f"fed.early-stop-patience: expected >= 0, got {self.early_stop_patience}")
        if self.secagg_clip != 0 and not CLIP_RANGE[0] <= self.secagg_clip <= CLIP_RANGE[1]:
            out.append(f"fed.secagg-clip: expected 0 (auto) or {CLIP_RANGE[0]:g}..{CLIP_RANGE[1]:g} (what nodes accept "
                       f"by default), got {self.secagg_clip}")
        if self.secagg_max_weight < 1:
            out.append(f"fed.secagg-max-weight: expected >= 1, got {self.secagg_max_weight}")
        if not 0.5 <= self.secagg_threshold < 1:
            out.append(f"fed.secagg-threshold: expected 0.5 <= share < 1 (below 0.5 the threshold is not a strict "
                       f"majority of a node's neighbours, which nodes refuse), got {self.secagg_threshold}")
        if self.secagg_degree < 0 or self.secagg_degree == 1:
            out.append(f"fed.secagg-degree: expected 0 (automatic) or >= 2, got {self.secagg_degree}")
        if self.secure_aggregation:
            if self.min_nodes < MIN_COHORT:
                out.append(f"fed.min-nodes={self.min_nodes} with secure aggregation: expected >= {MIN_COHORT} (with "
                           "2 nodes each would learn the other's update from the sum); raise it or set "
                           "fed.secure-aggregation=false")
            fitting = max_weight_fitting(self.num_nodes)
            if effective_max_weight(self.aggregation, self.secagg_max_weight) > fitting:
                out.append(f"fed.secagg-max-weight={self.secagg_max_weight} with {self.num_nodes} nodes: the "
                           f"weighted sum would not fit in 32 bits; lower it to at most {fitting:,} or use "
                           "fed.aggregation=uniform")
        if tracking.unknown(self.tracking):
            out.append(f"fed.tracking: expected empty (off) or a comma-separated list of {', '.join(tracking.TRACKERS)}"
                       f", got {self.tracking!r}")
        if self.tracking_uri and "mlflow" not in tracking.parse(self.tracking):
            out.append("fed.tracking-uri is for MLflow: add mlflow to fed.tracking, or leave fed.tracking-uri empty")
        elif self.tracking_uri and not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:|databricks$", self.tracking_uri):
            out.append(f"fed.tracking-uri: expected an MLflow tracking URI such as sqlite:///runs/mlflow.db or "
                       f"http://HOST:5000 (a bare directory is MLflow's retired file store), got {self.tracking_uri!r}")
        for name, v in (("round-timeout", self.round_timeout), ("node-wait-timeout", self.node_wait_timeout)):
            if v <= 0:
                out.append(f"fed.{name}: expected > 0 seconds, got {v}")
        return out


@dataclass(frozen=True)
class SimConfig:
    partitioner: str = _f("dirichlet", f"how records are split across virtual nodes: {', '.join(PARTITIONERS)}")
    alpha: float = _f(1.0, "Dirichlet concentration (smaller = more skewed label mixes)")
    labels_per_node: int = _f(2, "label-skew partitioner: labels each node holds")
    seed: int = _f(0, "seed of the partitioning")
    local_test_fraction: float = _f(0.2, "share of each node's partition kept for its local evaluation")
    node_max_epsilon: float = _f(8.0, "privacy ceiling of every simulated node")
    cpus_per_node: int = _f(1, "torch threads (and Ray CPUs) each virtual node trains with")
    concurrent_nodes: int = _f(0, "virtual nodes that run at once on a private local Ray; 0 = auto: every node, up "
                               "to twice the cores / sim.cpus-per-node (the OS shares the cores, so none idles "
                               "while a slow node finishes); 1 = one after another")
    gpus_per_node: float = _f(0.0, "GPUs (fractions allowed, e.g. 0.25) Ray gives each virtual node; 0 = the "
                              "simulation runs on the CPU (train.device=auto becomes cpu)")
    ray_address: str = _f("", "run on an existing Ray cluster (e.g. auto, or HEAD:6379; also $RAY_ADDRESS) instead "
                          "of a private local one; empty = private")
    baseline_epochs: float = _f(2.0, "epochs of the centralized and local-only baselines")
    min_partition_size: int = _f(0, "fewest records a virtual node may get (0: enough for one training batch "
                                 "after its local test split)")

    def problems(self) -> list[str]:
        out = []
        if self.partitioner not in PARTITIONERS:
            out.append(f"sim.partitioner: expected one of {', '.join(PARTITIONERS)}, got {self.partitioner!r}")
        if self.alpha <= 0:
            out.append(f"sim.alpha: expected > 0, got {self.alpha}")
        if self.labels_per_node < 1:
            out.append(f"sim.labels-per-node: expected >= 1, got {self.labels_per_node}")
        if not 0 <= self.local_test_fraction < 0.9:
            out.append(f"sim.local-test-fraction: expected 0 <= fraction < 0.9, got {self.local_test_fraction}")
        if self.node_max_epsilon <= 0:
            out.append(f"sim.node-max-epsilon: expected > 0, got {self.node_max_epsilon}")
        if self.baseline_epochs <= 0:
            out.append(f"sim.baseline-epochs: expected > 0, got {self.baseline_epochs}")
        if self.cpus_per_node < 1:
            out.append(f"sim.cpus-per-node: expected >= 1, got {self.cpus_per_node}")
        if self.concurrent_nodes < 0:
            out.append(f"sim.concurrent-nodes: expected >= 0 (0 = auto), got {self.concurrent_nodes}")
        if not 0 <= self.gpus_per_node <= 64:
            out.append(f"sim.gpus-per-node: expected 0..64, got {self.gpus_per_node}")
        if self.min_partition_size < 0:
            out.append(f"sim.min-partition-size: expected >= 0, got {self.min_partition_size}")
        return out


@dataclass(frozen=True)
class JobConfig:
    """The whole job: what every node trains and how privately."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    sim: SimConfig = field(default_factory=SimConfig)

    def to_flat(self) -> dict[str, Any]:
        """The configuration as flat ``section.key`` settings (round-trips through load_config)."""
        flat: dict[str, Any] = {}
        for sec in dataclasses.fields(self):
            section = getattr(self, sec.name)
            for f in dataclasses.fields(section):
                flat[f"{sec.name}.{_key(f.name)}"] = getattr(section, f.name)
        return flat

    @property
    def secagg_clip(self) -> float:
        """The secure-aggregation clip in force: fed.secagg-clip, or by default 1 for LoRA and 10 for a head alone."""
        if self.fed.secagg_clip:
            return self.fed.secagg_clip
        return 10.0 if self.lora.head_only else 1.0

    def replace(self, **settings: Any) -> JobConfig:
        """A copy with some flat settings changed (validated like any other)."""
        flat = self.to_flat()
        flat.update(settings)
        return load_config(flat)


def _key(name: str) -> str:
    return name.replace("_", "-")


# The defaults above are the recommended recipe (docs/federation.md, "Which recipe"): a DP linear probe of a seq-cls
# encoder. A causal LM has no classification head to probe, so the settings below default differently for
# model.task=causal-lm (the LoRA recipe); a value the job gives always wins. `fedtune config` shows both.
CAUSAL_LM_DEFAULTS: dict[str, Any] = {"model.pooling": "cls", "lora.ffa": False, "lora.head-only": False,
                                      "train.optimizer": "adamw", "train.lr": 3e-3, "train.batch-size": 32,
                                      "privacy.max-grad-norm": 1.0}

SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraConfig, "privacy": PrivacyConfig, "data": DataConfig,
                             "train": TrainConfig, "fed": FedConfig, "sim": SimConfig}


TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")


def parse_bool(value: Any) -> bool | None:
    """A yes/no setting, the one way job and node configs read it: a bool, 0 or 1, or a string in TRUE or
    FALSE (any case, surrounding spaces ignored); None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return bool(value) if value in (0, 1) else None
    if isinstance(value, str):
        v = value.strip().lower()
        return True if v in TRUE else False if v in FALSE else None
    return None


def _coerce(value: Any, typ: Any, key: str) -> tuple[Any, str | None]:
    """Turn a string or Flower value into ``typ``; return (value, problem)."""
    if isinstance(typ, str):
        typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ)
    if typ is bool:
        b = parse_bool(value)
        return (b, None) if b is not None else (None, f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            return None, f"{key}: expected an integer, got {value!r}"
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        try:
            return int(str(value).strip()), None
        except ValueError:
            return None, f"{key}: expected an integer, got {value!r}"
    if typ is float:
        if isinstance(value, bool):
            return None, f"{key}: expected a number, got {value!r}"
        try:
            return float(value), None
        except (TypeError, ValueError):
            return None, f"{key}: expected a number, got {value!r}"
    if typ is str:
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value), None
        return str(value), None
    raise TypeError(f"unsupported config type {typ!r} for {key}")  # a bug, not a user error


def load_config(settings: Mapping[str, Any] | None = None) -> JobConfig:
    """Build a validated :class:`JobConfig` from flat settings over the defaults.

    Args:
        settings: ``{"lora.r": "16", "privacy.target-epsilon": 4.0, ...}``; strings
            are parsed, typed values are checked. Keys may use ``_`` or ``-``.

    Raises:
        ConfigError: listing every unknown key, bad value and out-of-range field.
    """
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for raw_key, raw_value in (settings or {}).items():
        key = str(raw_key).strip()
        section, _, name = key.partition(".")
        cls = SECTIONS.get(section)
        fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
        fname = name.replace("-", "_")
        if cls is None or fname not in fields:
            problems.append(f"{key}: unknown setting{_suggest(key)}")
            continue
        value, problem = _coerce(raw_value, fields[fname].type, key)
        if problem:
            problems.append(problem)
        else:
            values[section][fname] = value
    if values["model"].get("task", ModelConfig.task) == "causal-lm":
        for key, default in CAUSAL_LM_DEFAULTS.items():
            section, _, name = key.partition(".")
            values[section].setdefault(name.replace("-", "_"), default)
    sections = {}
    for name, cls in SECTIONS.items():
        sections[name] = cls(**values[name])
        problems.extend(sections[name].problems())
    if (sections["data"].response_column or sections["data"].messages_column) and sections["model"].task != "causal-lm":
        problems.append("data.response-column / data.messages-column are for instruction tuning: set "
                        "model.task=causal-lm, or leave them empty for classification")
    if sections["data"].response_column and sections["data"].messages_column:
        problems.append("data.response-column and data.messages-column are both set: give prompt/response columns "
                        "or chat messages, not both")
    if sections["lora"].head_only and sections["model"].task != "seq-cls":
        problems.append("lora.head-only=true: only a seq-cls model has a classification head to train; set "
                        "lora.head-only=false for model.task=causal-lm")
    if problems:
        raise ConfigError(problems)
    return JobConfig(**sections)


def from_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a Flower run config really gives: Flower hands every key of pyproject's table (the defaults)
    plus the overrides, so a value equal to its default is left out and the task's defaults
    (:data:`CAUSAL_LM_DEFAULTS`) apply as they do for ``fedtune`` commands."""
    defaults = JobConfig().to_flat()
    return {k: v for k, v in run_config.items() if k not in defaults or defaults[k] != v}


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key.replace("_", "-"), all_keys(), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def all_keys() -> list[str]:
    return [f"{s}.{_key(f.name)}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def describe() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every setting, for ``fedtune config``."""
    rows = []
    for s, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            tname = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            key, help_ = f"{s}.{_key(f.name)}", f.metadata.get("help", "")
            if key in CAUSAL_LM_DEFAULTS:
                help_ += f" (model.task=causal-lm: default {CAUSAL_LM_DEFAULTS[key]})"
            rows.append((key, tname, f.default, help_))
    return rows


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """Parse command-line ``key=value`` words into a dict (values stay strings)."""
    out: dict[str, str] = {}
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError([f"{p!r}: expected key=value (e.g. lora.r=16)" for p in bad])
    for p in pairs:
        k, _, v = p.partition("=")
        out[k.strip()] = v.strip().strip('"').strip("'")
    return out

