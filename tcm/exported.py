"""The dataset layout ``tcm-serve export-dataset`` writes and ``tcm-train retrain`` reads: one
folder per (tenant, subject), named ``<tenant>__<subject>``. Defined here, in the package both
sides import, because ``service`` and ``training`` may not import each other."""

from __future__ import annotations

TENANT_SEP = "__"


def class_folder_name(tenant_id: str, subject_part: str) -> str:
    """An exported class folder's name (``subject_part``: the subject, made path-safe)."""
    return f"{tenant_id}{TENANT_SEP}{subject_part}"


def tenant_of(folder: str) -> str | None:
    """The tenant an exported class folder belongs to; None for a name not of that shape."""
    tenant, sep, rest = folder.partition(TENANT_SEP)
    return tenant if sep and tenant and rest else None
