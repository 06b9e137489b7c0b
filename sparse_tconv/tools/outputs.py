"""Output paths of the commands, checked before any work is done."""

from __future__ import annotations

from pathlib import Path

__all__ = ["output_path_problem"]


def output_path_problem(path, option: str, *, force: bool = True) -> str | None:
    """Why ``path`` cannot be written (a one-line message naming ``option``), or None.

    Its folder must exist, it must not be a folder, and unless ``force`` it
    must not exist yet.  ``None`` (the option not given) is fine.
    """
    if path is None:
        return None
    target = Path(path)
    if not target.resolve().parent.is_dir():
        return f"{option}: the folder of {str(path)!r} does not exist"
    if target.is_dir():
        return f"{option}: {str(path)!r} is a folder, not a file"
    if not force and target.exists():
        return f"{option}: {str(path)!r} exists; pass --force to overwrite it"
    return None
