"""train.device: where training, evaluation and inference run; a GPU asked for on a machine without one is one
clear error, before anything is loaded or spent."""

from __future__ import annotations

import pytest
import torch
from fedtune.cli import main
from fedtune.common.errors import ConfigError, ModelError
from fedtune.common.training import adapter, node
from fedtune.common.training.config import load_config
from fedtune.common.training.model import build_lora_model, resolve_device, resolve_dtype
from helpers import EASY_LABELS, small_config, write_easy_csv

HAS_CUDA = torch.cuda.is_available()


def test_auto_picks_a_gpu_only_when_torch_sees_one():
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_device_that_is_not_a_device_is_a_config_error():
    with pytest.raises(ConfigError, match="train.device"):
        load_config({"train.device": "gpu"})


def test_cuda_without_a_gpu_is_one_clear_error(tmp_path, capsys):
    if HAS_CUDA:  # on a GPU machine the same request must be refused for a device that is not there
        spec = f"cuda:{torch.cuda.device_count()}"
    else:
        spec = "cuda"
    with pytest.raises(ModelError, match=f"train.device={spec}"):
        resolve_device(spec)
    # through the command line: exit 1, the problem and the fix, no traceback, nothing spent or written
    data = write_easy_csv(tmp_path / "easy.csv", n=60)
    code = main(["local", "--data", str(data), "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "out"),
                 "data.labels=" + ",".join(EASY_LABELS), f"train.device={spec}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"train.device={spec}" in err and "fix: set train.device=cpu" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()  # no ledger opened, nothing spent


def test_training_on_the_chosen_device_moves_every_lora_tensor(tmp_path):
    # Prepare: the model built on train.device=auto (a GPU when this machine has one), moved before PEFT wraps it
    lm = build_lora_model(model_path="", task="seq-cls", labels=EASY_LABELS, r=4, alpha=8, dropout=0.0,
                          target_modules=None, ffa=False, seed=0, device="auto")
    want = resolve_device("auto")  # "cuda" carries no index; the parameters say cuda:0
    assert all(p.device.type == want.type and want.index in (None, p.device.index) for p in lm.model.parameters())
    csv_path = write_easy_csv(tmp_path / "easy.csv", n=96)
    cfg = small_config(**{"data.path": str(csv_path), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "train.local-steps": 3, "train.batch-size": 16})
    n = node.prepare(cfg, node.NodePolicy(source="easy", max_epsilon=50), state_dir=tmp_path / "state", model=lm)
    before = adapter.pack(lm.model, ffa=False)
    # Execute: a DP round and an evaluation
    result = node.train_round(n, job="t", round=1, federated=False)
    metrics = node.evaluate_split(n, "test")
    # Assert: every LoRA tensor (A, B) and the head changed; the figures come back as plain numbers
    assert any("lora_A" in k for k in before) and any("lora_B" in k for k in before)
    for k in before:
        assert not torch.equal(torch.as_tensor(before[k]), torch.as_tensor(result.arrays[k])), f"{k} unchanged"
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n"] > 0


def test_precision_auto_is_fp32_on_a_cpu_and_a_bad_value_is_a_config_error():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="train.precision"):
        load_config({"train.precision": "fp16"})


@pytest.mark.parametrize("task", ["seq-cls", "causal-lm"])
def test_a_bf16_base_trains_fp32_weights_under_dp(tmp_path, task):
    # Prepare: the same seeded model in fp32 and with its frozen base in bf16 (forced: this CPU has no GPU)
    kw = dict(model_path="", task=task, labels=EASY_LABELS if task == "seq-cls" else [], r=4, alpha=8, dropout=0.0,
              target_modules=None, ffa=False, seed=0, device="cpu")
    full = build_lora_model(**kw, precision="fp32")
    half = build_lora_model(**kw, precision="bf16")
    frozen = [p for p in half.model.parameters() if not p.requires_grad]
    trained = [p for p in half.model.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen if p.is_floating_point())
    assert trained and all(p.dtype == torch.float32 for p in trained)  # LoRA and the head stay fp32
    csv_path = write_easy_csv(tmp_path / "easy.csv", n=96)
    cfg = small_config(**{"data.path": str(csv_path), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "train.local-steps": 3, "train.batch-size": 16, "model.task": task,
                          "train.precision": "bf16"})
    n_half = node.prepare(cfg, node.NodePolicy(source="easy", max_epsilon=50), state_dir=tmp_path / "h", model=half)
    n_full = node.prepare(cfg.replace(**{"train.precision": "fp32"}), node.NodePolicy(source="easy", max_epsilon=50),
                          state_dir=tmp_path / "f", model=full)
    # the loss of the bf16 base is the fp32 loss up to bf16 rounding
    loss_half, loss_full = node.evaluate_split(n_half, "test")["loss"], node.evaluate_split(n_full, "test")["loss"]
    assert abs(loss_half - loss_full) < 0.05 * abs(loss_full) + 1e-3
    before = adapter.pack(half.model, ffa=False)
    # Execute: a DP round on the bf16 base
    result = node.train_round(n_half, job="t", round=1, federated=False)
    # Assert: every trained tensor changed, stayed fp32 and finite; the round was accounted as usual
    for k in before:
        after = torch.as_tensor(result.arrays[k])
        assert after.dtype == torch.float32 and torch.isfinite(after).all()
        assert not torch.equal(torch.as_tensor(before[k]), after), f"{k} unchanged"
    assert all(p.dtype == torch.float32 for p in half.model.parameters() if p.requires_grad)
    assert result.stats.steps == 3 and result.epsilon_spent > 0
