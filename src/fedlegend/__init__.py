"""fedlegend: federated LoRA fine-tuning of pretrained language models on heterogeneous devices."""

__version__ = "0.1.0"
