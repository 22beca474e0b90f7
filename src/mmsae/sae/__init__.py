"""Sparse autoencoders (library layer): the model, its architectures, sparse kernels and file formats.

    from mmsae.sae import SparseAutoencoder, SaeConfig, load_sae
    sae = load_sae("RUN/sae")                       # sparsify, SAELens or mmsae layout
    values, indices = sae.encode_sparse(acts)       # [..., k] each
    recon = sae.decode_sparse(values, indices)      # == sae(acts)

Training and evaluation are stages on top: ``mmsae.train.train(TrainConfig(...))`` and
``mmsae.evaluate.evaluate(EvaluateConfig(...))``. Nothing here reads stores, models or data.
"""

from .formats import load_sae, save_sae
from .model import SaeConfig, SparseAutoencoder

__all__ = ["SaeConfig", "SparseAutoencoder", "load_sae", "save_sae"]
