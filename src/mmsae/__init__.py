"""mmsae: sparse autoencoders that find, explain, score and steer features of multimodal models."""

__version__ = "0.1.0"
