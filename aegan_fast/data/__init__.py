"""Data: preparing image sets (prepare.py), decoding real-world images (images.py), the in-memory or
memory-mapped image set (dataset.py) and the trainer's loaders (loaders.py).

``python -m aegan_fast.data prepare SRC OUT --resolution R`` prepares a folder or archive.
"""
from .dataset import (ImageSet, cache_root, fetch_emoji, load_dataset, load_folder, open_prepared,
                      flip_where, prepared_cache_dir, read_images, to_float, to_uint8)
from .images import IMAGE_SUFFIXES, Skip, decode
from .loaders import LOADERS, DaliLoader, TorchLoader, choose_loader, dali_unavailable, make_loader
from .prepare import ensure_encoded, is_prepared, prepare, read_manifest

__all__ = ["ImageSet", "cache_root", "fetch_emoji", "load_dataset", "load_folder", "open_prepared",
           "flip_where", "prepared_cache_dir", "read_images", "to_float", "to_uint8", "IMAGE_SUFFIXES", "Skip", "decode",
           "LOADERS", "DaliLoader", "TorchLoader", "choose_loader", "dali_unavailable", "make_loader",
           "ensure_encoded", "is_prepared", "prepare", "read_manifest"]
