"""fedtune: federated, differentially private LoRA fine-tuning (command-line entry point)."""

__version__ = "0.1.0"
