"""Start-up hook for a CPU-only torch beside PyPI's CUDA-linked torchvision.

PyPI's torchvision wheels link their C++ operator library against CUDA torch. Beside the CPU
build of torch that library does not load, and ``import torchvision`` then fails when its meta
registrations look for ``torchvision::nms``. Declaring the two operator schemas first lets the
pure-Python parts (transforms, models) import; ``torchvision.ops`` C++ kernels stay unavailable,
which this project never uses. The setup script installs this hook (as a ``.pth`` line) only into
virtual environments where the plain import fails, so a working torchvision is never touched.
"""

import torch

_lib = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _lib.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
