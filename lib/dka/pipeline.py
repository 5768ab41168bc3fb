"""The DVC pipeline's stages: their names per profile, and running one without risking committed results.

dvc.yaml lists every profile of params.yaml in its `vars:` lists (`profiles` run 01-05 and the claims table,
`related_profiles` run 06), so each notebook has one stage per profile of its list (`01_cifar@smoke`,
`01_cifar@demo`, ...) with its own dvc.lock record; a profile is run by naming its stages (`stage_names`,
what `make repro PROFILE=...` does), and params.yaml is never edited.

DVC deletes a stage's outputs before running it. For `results/<profile>/<stage>/`, committed to git with
`cache: false`, a failing stage then left nothing behind. dvc.yaml therefore marks them `persist: true`
(DVC leaves them alone) and runs each stage through `run_stage`, which checks params.yaml first, sets
the previous results aside, executes the notebook into a fresh folder and, if it fails, puts the
previous results back (the failed run's output goes to `runs/<profile>/.failed/<stage>/`): a stage either
replaces its results entirely or leaves them exactly as they were.
A stage killed outright (SIGKILL runs no cleanup) is repaired at its next start, before anything else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from dka.profiles import check_params, declared_profiles, profile_lists, stage_profiles

__all__ = ["stage_names", "run_stage", "results_dir", "set_aside_dir", "failed_dir", "notebook_command",
           "NOTEBOOK_ENV"]


def stage_names(root: str | Path, profile: str) -> list[str]:
    """DVC's names of `profile`'s stages (`01_cifar@demo`, ...), in dvc.yaml's order."""
    root = Path(root)
    if profile not in declared_profiles(root):
        raise ValueError(f"dvc.yaml defines no stage for profile {profile!r}: add it to one of its `vars:` lists "
                         f"({', '.join(profile_lists(root))})")
    return [f"{name}@{profile}" for name, members in stage_profiles(root).items() if profile in members]


def results_dir(root: str | Path, stage: str, profile: str) -> Path:
    """`results/<profile>/<stage>/`, the stage's committed results."""
    return Path(root) / "results" / profile / stage


def set_aside_dir(root: str | Path, stage: str, profile: str) -> Path:
    """Where the previous results wait while the stage runs (beside them, so renames are atomic)."""
    return Path(root) / "results" / profile / f".{stage}.previous"


def failed_dir(root: str | Path, stage: str, profile: str) -> Path:
    """Where a failed run's output goes (under runs/, ignored by git), for its executed notebook's error."""
    return Path(root) / "runs" / profile / ".failed" / stage


# The notebooks run without slider widgets (no kernel will drive them in the recorded copy).
NOTEBOOK_ENV = {"DKA_WIDGETS": "0"}


def notebook_command(stage: str, profile: str) -> list[str]:
    """The papermill command that executes notebook `stage` at `profile` (run from the project root, with
    NOTEBOOK_ENV); --log-output streams the notebook's own lines (one per epoch and model) to the terminal."""
    return [sys.executable, "-m", "papermill", "--log-output", "--cwd", "notebooks", f"notebooks/{stage}.ipynb",
            f"results/{profile}/{stage}/{stage}.ipynb", "-p", "profile", profile]


def _put_back(results: Path, previous: Path) -> None:
    if results.exists():
        shutil.rmtree(results)
    previous.rename(results)


def run_stage(root: str | Path, stage: str, profile: str,
              execute: Callable[[Sequence[str], Path], int] | None = None) -> int:
    """Run notebook `stage` at `profile`; its results are replaced only if it succeeds. Returns the exit code.

    Args:
        root: the project root (dvc.yaml, params.yaml, notebooks/, results/).
        execute: runs a command in a folder and returns its exit code (default: a subprocess).
    """
    root = Path(root)
    results, previous = results_dir(root, stage, profile), set_aside_dir(root, stage, profile)
    if not (root / "notebooks" / f"{stage}.ipynb").is_file():
        raise FileNotFoundError(f"no notebook {root / 'notebooks' / f'{stage}.ipynb'} for stage {stage!r}")
    if previous.exists():  # a run of this stage was killed: its partial results go, the previous come back
        _put_back(results, previous)
        print(f"restored {results} from {previous.name}, set aside by a run that was killed", flush=True)
    check_params(root / "params.yaml", profile)  # a typo stops here, before the results are touched
    if (root / "dvc.yaml").is_file() and f"{stage}@{profile}" not in stage_names(root, profile):
        raise ValueError(f"profile {profile!r} has no stage {stage!r} in dvc.yaml (its stages: "
                         f"{', '.join(stage_names(root, profile))}); add the profile to the `vars:` list the "
                         "stage's `foreach` names")
    if results.exists():
        results.rename(previous)
    results.mkdir(parents=True)
    execute = execute or (lambda argv, cwd: subprocess.run(list(argv), cwd=cwd,
                                                           env={**os.environ, **NOTEBOOK_ENV}).returncode)
    code = 1
    try:
        code = execute(notebook_command(stage, profile), root)
    finally:
        if code == 0:
            if previous.exists():
                shutil.rmtree(previous)
        else:
            failed = failed_dir(root, stage, profile)
            if failed.exists():
                shutil.rmtree(failed)
            failed.parent.mkdir(parents=True, exist_ok=True)
            results.rename(failed)
            kept = "kept as it was before the run" if previous.exists() else "absent (it had no earlier results)"
            if previous.exists():
                previous.rename(results)
            print(f"stage {stage}@{profile} failed (exit {code}): {results} is {kept}; the failed run's output "
                  f"(its executed notebook shows the error) is in {failed}", file=sys.stderr, flush=True)
    return code
