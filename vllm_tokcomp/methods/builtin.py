"""Imports every built-in method module so that each registers itself."""

from . import (  # noqa: F401
    adjacent,
    cls_topk,
    mustdrop,
    pool,
    prumerge,
    tome,
    uniform,
)
