"""Gives a volunteer a filesystem view holding only what it needs, then runs it.

A network namespace cuts a volunteer off from the head's TCP ports, but not from unix sockets: a
socket path is reachable from every network namespace. The head's raylet, plasma store and
dashboard modules listen on sockets under its temp dir, and the dashboard's module sockets take
requests without Ray's token, so a volunteer that can see those paths can submit a job to the
head without the tunnel. It could also read other volunteers' credentials.

Run inside ``ip netns exec`` (which already gives the process its own mount namespace, with the
host's mounts propagating in but none going back out), this replaces ``/tmp`` with an empty
tmpfs holding only the paths passed with ``--expose`` (bind-mounted at the same place: the
gateway's socket, the CA, the volunteer's own state and Ray directories), puts empty tmpfs over
``/dev/shm`` (where Ray keeps object store files) and over each ``--hide`` directory (the control
plane's state dir), and then executes the command.

    python -m koinon_dev.volunteer_sandbox --expose PATH... --hide DIR... -- COMMAND...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

COVERED = Path("/tmp")
STAGE = Path("/dev/shm")


def _mount(*args: str) -> None:
    completed = subprocess.run(["mount", *args], capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"volunteer sandbox: mount {' '.join(args)} failed: {completed.stderr.strip()}")


def isolate(expose: list[Path], hide: list[Path]) -> None:
    """Builds the view on a staging tmpfs, then moves it over /tmp in one step (a path exposed is
    bind-mounted while the original is still visible). The staging mount point is /dev/shm, which
    always exists and is covered afterwards anyway, so nothing is left on the host."""
    for path in expose:
        if not path.is_relative_to(COVERED) or not path.exists():
            raise SystemExit(f"volunteer sandbox: --expose {path}: must exist under {COVERED}")
    _mount("-t", "tmpfs", "-o", "mode=1777,size=64m", "koinon-sandbox", str(STAGE))
    for path in expose:
        inside = STAGE / path.relative_to(COVERED)
        inside.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            inside.mkdir(exist_ok=True)
        else:
            inside.touch()
        _mount("--bind", str(path), str(inside))
    _mount("--rbind", str(STAGE), str(COVERED))
    if subprocess.run(["umount", "--lazy", str(STAGE)], capture_output=True).returncode != 0:
        raise SystemExit(f"volunteer sandbox: could not unmount the staging tmpfs at {STAGE}")
    for directory in [STAGE, *hide]:
        if directory != STAGE and directory.is_relative_to(COVERED):
            continue  # gone with the rest of /tmp
        _mount("-t", "tmpfs", "-o", "mode=1777", "koinon-hidden", str(directory))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m koinon_dev.volunteer_sandbox")
    parser.add_argument("--expose", action="append", type=Path, default=[], help="a path under /tmp to keep")
    parser.add_argument("--hide", action="append", type=Path, default=[], help="a directory to cover")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    isolate([p.resolve() for p in args.expose], [p.resolve() for p in args.hide])
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
