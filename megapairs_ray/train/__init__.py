"""MMRet: the composed-image retriever trained on MegaPairs triplets, and its evaluation.

Model, loss and metrics are plain PyTorch / NumPy (no Ray) so they are testable alone; the Ray
Train job that drives them is separate.
"""
