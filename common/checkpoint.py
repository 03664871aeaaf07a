"""Run directories, atomic checkpoints, and the small files every run writes.

A run directory (`results/<name>/`) holds config.json, checkpoint.pt, loss.csv, figures and
samples. Training refuses a non-empty directory unless told to `--resume` or `--overwrite`,
so a typo never destroys a finished run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.cli import UserError

CHECKPOINT = "checkpoint.pt"
# Files that mark a directory as one of our runs (so --overwrite may clear it).
RUN_MARKERS = ("config.json", CHECKPOINT, "loss.csv")


def prepare_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create or check the output directory of a training run.

    - empty or absent: created;
    - non-empty with `resume`: kept (it must hold a checkpoint);
    - non-empty with `overwrite`: cleared, but only if it looks like a run directory;
    - non-empty otherwise: refused.
    """
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise UserError(f"--resume: no {CHECKPOINT} in {out}")
        return out
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"output directory {out} is not empty; pass --resume to continue that run, "
                "--overwrite to replace it, or choose another --out"
            )
        if not any((out / m).exists() for m in RUN_MARKERS):
            raise UserError(
                f"refusing to --overwrite {out}: it does not look like a run directory "
                f"(none of {', '.join(RUN_MARKERS)})"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save through a temp file in the same directory, then os.replace.

    A crash or Ctrl-C while writing leaves the previous checkpoint intact.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def existing_run_dir(run: str | Path) -> Path:
    """`--run` of an evaluate command: a directory that exists (a UserError otherwise)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"--run {run} is not a run directory")
    return run


def resolve_checkpoint(run: str | Path) -> Path:
    """`--run` may name a run directory or a checkpoint file."""
    run = Path(run)
    path = run / CHECKPOINT if run.is_dir() else run
    if not path.is_file():
        where = f"run directory {run} has no {CHECKPOINT}" if run.is_dir() else f"{run} does not exist"
        raise UserError(f"no checkpoint: {where}")
    return path


def load_checkpoint(run: str | Path, kind: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` and check it is of `kind` ('vae'|'ddpm')."""
    path = resolve_checkpoint(run)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint (corrupt or not ours): {first[:200]}") from None
    if not isinstance(state, dict) or "kind" not in state:
        raise UserError(f"{path} is not a checkpoint of this project (no 'kind' recorded)")
    if state["kind"] != kind:
        raise UserError(f"{path} is a '{state['kind']}' checkpoint, but this tool needs a '{kind}' one")
    return state


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty JSON, written atomically (config.json, metrics.json)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def append_csv(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row; the header (column names with units) is written with the first row."""
    path = Path(path)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a numeric CSV written by `append_csv`."""
    with Path(path).open(newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def truncate_csv(path: str | Path, column: str, last: float) -> None:
    """Drop rows whose `column` is past `last` (rows logged after the checkpoint we resume)."""
    path = Path(path)
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if float(r[column]) <= last]
    if len(kept) != len(rows):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)
