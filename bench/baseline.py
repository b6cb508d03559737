"""Before/after in one run: build infermon at a git ref in its own worktree and venv, then bench both.

Usage::

    .venv/bin/python -m bench.baseline REF [--dir DIR] [--prepare-only] [-- BENCH.RUN ARGS...]
    .venv/bin/python -m bench.baseline --remove REF
    make bench-compare REF=HEAD~3 ARGS='--duration 10 --rounds 3'

REF is any git ref (a commit, a branch, ``HEAD~3``, ``main``). The worktree is checked out detached
at REF's commit under ``$TMPDIR/infermon-bench-baseline/<commit>`` (outside the repository, so no
linter or test run sees it), with a venv of its own in ``.venv``, and reused while that commit's
build is there. The venv gets the package at REF and its dependencies at the versions this venv has
(a constraints file from ``pip freeze``), so the two builds differ in infermon's code only; when REF
needs other versions, it is installed without the constraints and the report says so. Then
``python -m bench.run --baseline <worktree>/.venv/bin/infermon ARGS...`` runs, so infermon at REF is
measured as ``infermon-before`` beside this checkout's ``infermon``, interleaved, in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import run

STAMP = ".bench-baseline-built"


class BaselineFailed(RuntimeError):
    """The ref could not be checked out or built."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def git(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BaselineFailed(f"git {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def repository() -> Path:
    """The top of the git checkout this module lives in."""
    return Path(git("rev-parse", "--show-toplevel", cwd=Path(__file__).resolve().parent))


def commit_of(ref: str, repo: Path) -> str:
    return git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", cwd=repo)


def default_dir(commit: str) -> Path:
    return Path(tempfile.gettempdir()) / "infermon-bench-baseline" / commit[:12]


def constraints(directory: Path) -> Path:
    """This venv's installed versions (infermon itself left out) as a pip constraints file."""
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    keep = [
        line
        for line in frozen.splitlines()
        if line and not line.startswith(("-", "#")) and " @ " not in line and not line.startswith("infermon")
    ]
    path = directory / "constraints.txt"
    path.write_text("\n".join(keep) + "\n")
    return path


def prepare(ref: str, directory: Path | None = None) -> Path:
    """The infermon executable built from `ref` (checked out and installed on first use)."""
    repo = repository()
    commit = commit_of(ref, repo)
    where = directory or default_dir(commit)
    infermon = where / ".venv" / "bin" / "infermon"
    stamp = where / STAMP
    if infermon.exists() and stamp.exists() and stamp.read_text().strip() == commit:
        say(f"[baseline] {ref} = {commit[:12]}: reusing {where}")
        return infermon
    git("worktree", "prune", cwd=repo)
    if where.exists():
        listed = git("worktree", "list", "--porcelain", cwd=repo)
        if f"worktree {where}" not in listed.splitlines():
            raise BaselineFailed(f"{where} exists and is not a worktree of {repo}: remove it or pass --dir")
        git("checkout", "--detach", "--quiet", commit, cwd=where)
    else:
        where.parent.mkdir(parents=True, exist_ok=True)
        say(f"[baseline] git worktree add --detach {where} {commit[:12]}")
        git("worktree", "add", "--detach", "--quiet", str(where), commit, cwd=repo)
    venv = where / ".venv"
    if not (venv / "bin" / "python").exists():
        say(f"[baseline] creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    say(f"[baseline] installing infermon at {commit[:12]} (dependencies at this venv's versions)")
    with tempfile.TemporaryDirectory(prefix="infermon-baseline-") as scratch:
        pinned = subprocess.run([*pip, "-c", str(constraints(Path(scratch))), str(where)], check=False)
    if pinned.returncode != 0:
        say(f"[baseline] WARNING: {ref} needs other dependency versions; installing it with its own")
        subprocess.run([*pip, str(where)], check=True)
    if not infermon.exists():
        raise BaselineFailed(f"{infermon} was not installed: does {ref} have the infermon command?")
    stamp.write_text(commit + "\n")
    return infermon


def remove(ref: str, directory: Path | None = None) -> None:
    repo = repository()
    where = directory or default_dir(commit_of(ref, repo))
    if where.exists():
        git("worktree", "remove", "--force", str(where), cwd=repo)
        shutil.rmtree(where, ignore_errors=True)
    git("worktree", "prune", cwd=repo)
    say(f"[baseline] removed {where}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="git ref to measure as infermon-before (commit, branch, HEAD~3, ...)")
    parser.add_argument("--dir", type=Path, default=None, help="worktree directory (a temp dir per commit)")
    parser.add_argument("--prepare-only", action="store_true", help="build it and print the infermon path")
    parser.add_argument("--remove", action="store_true", help="remove the worktree of REF and exit")
    args = parser.parse_args(argv)
    try:
        if args.remove:
            remove(args.ref, args.dir)
            return 0
        infermon = prepare(args.ref, args.dir)
    except (BaselineFailed, subprocess.CalledProcessError) as exc:
        say(f"[baseline] {exc}")
        return 2
    if args.prepare_only:
        print(infermon)
        return 0
    name = f"{args.ref} ({commit_of(args.ref, repository())[:12]})"
    say(f"[baseline] python -m bench.run --baseline {infermon} --baseline-name '{name}' {' '.join(rest)}")
    return run.main(["--baseline", str(infermon), "--baseline-name", name, *rest])


if __name__ == "__main__":
    sys.exit(main())
