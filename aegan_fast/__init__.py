"""aegan_fast: a fast PyTorch engine for AEGAN (Auto-Embedding GANs, Guo et al. 2019).

The data flows one way: data -> models (through ops) -> train stages -> checkpoints -> sample/export/eval.
"""
__version__ = "0.1.0"
