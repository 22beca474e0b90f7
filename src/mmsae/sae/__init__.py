"""Sparse autoencoders: the model, its sparse kernels, training, metrics and file formats.

    from mmsae.sae import SparseAutoencoder, SaeConfig, load_sae
    sae = load_sae("RUN/sae")                       # sparsify, SAELens or mmsae layout
    values, indices = sae.encode_sparse(acts)       # [..., k] each
    recon = sae.decode_sparse(values, indices)      # == sae(acts)

Training is ``mmsae.sae.train.train(TrainConfig(...))``; evaluation
``mmsae.sae.metrics.evaluate(EvaluateConfig(...))`` (imported lazily: they pull in more).
"""

from .formats import load_sae, save_sae
from .model import SaeConfig, SparseAutoencoder

__all__ = ["SaeConfig", "SparseAutoencoder", "load_sae", "save_sae"]
