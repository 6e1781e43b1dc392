"""aegan_fast: a fast PyTorch engine for AEGAN (Auto-Embedding GANs, Guo et al. 2019).

The data flows one way: data -> models (through ops) -> train stages -> checkpoints -> sample/export/eval.
"""
__version__ = "0.1.0"


def load(path, device="auto", **kwargs):
    """``aegan_fast.load(RUN)``: a trained run as a ``trained.TrainedModel`` (sample, encode, decode,
    reconstruct, interpolate, project). Imported lazily so ``import aegan_fast`` stays light."""
    from .trained import load as _load
    return _load(path, device, **kwargs)
