"""DetailFusion: composed image retrieval (reference image + modification text -> target image) on Ray."""

__version__ = "0.1.0"
