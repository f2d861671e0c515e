"""megapairs-ray: the MegaPairs data-synthesis system (arXiv 2412.14475) on Ray."""

__version__ = "0.1.0"
