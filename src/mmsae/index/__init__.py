"""The feature index: each feature's top images with their per-patch activation maps.

``build_index`` (:mod:`.build`) streams images through the model with the SAE attached at its
site and accumulates an :class:`IndexState` (:mod:`.state`) with per-feature statistics
(:mod:`.stats`); the folder it writes is read back by :class:`FeatureIndex` and can be built
from examples given by hand with :class:`IndexWriter` (:mod:`.folder`, which describes the layout).
"""

from .build import IndexConfig, build_index, encode_batch
from .folder import FORMAT, VERSION, Example, FeatureIndex, IndexWriter, index_fingerprint, sae_fingerprint
from .state import IndexState, random_key
from .stats import QUANTILE_LEVELS, ActivationStats, hist_edges, quantile_from_hist

__all__ = ["FORMAT", "VERSION", "QUANTILE_LEVELS", "ActivationStats", "Example", "FeatureIndex", "IndexConfig", "IndexState",
           "IndexWriter", "build_index", "encode_batch", "hist_edges", "index_fingerprint", "quantile_from_hist", "random_key",
           "sae_fingerprint"]
