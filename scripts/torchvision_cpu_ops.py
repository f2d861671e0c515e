"""Start-up hook for a CPU-only torch beside PyPI's CUDA-linked torchvision.

PyPI's torchvision wheels link their C++ operator library against CUDA torch. Beside the CPU
build of torch that library does not load, and ``import torchvision`` then fails when its meta
registrations look for ``torchvision::nms``. Declaring the two operator schemas first lets the
pure-Python parts (transforms, models) import; ``torchvision.ops`` C++ kernels stay unavailable,
which this project never uses. The setup script installs this hook (as a ``.pth`` line) only into
virtual environments where the plain import fails, so a working torchvision is never touched.

The schemas are declared when torchvision is first imported, not when Python starts: every
Python process runs a ``.pth`` line, Ray's workers and agents included, and importing torch
costs each of them about a second of CPU and a few hundred MB that most never use.
"""

import sys

_libraries = []  # a Library's definitions last as long as the object


class _DeclareOpsFirst:
    """A meta-path finder that finds nothing: on the first import of torchvision it declares
    the schemas, removes itself, and lets the regular finders go on."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _libraries.append(lib)
        return None


sys.meta_path.insert(0, _DeclareOpsFirst())
