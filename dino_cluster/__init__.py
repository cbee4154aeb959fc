"""dino-cluster: DINO self-supervised pretraining of Vision Transformers on real clusters."""

__version__ = "0.1.0"
