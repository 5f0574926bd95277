"""Run ``ndo serve`` with its data directory on a small tmpfs of its own (``test_disk_full``).

Usage, inside a private mount namespace (``unshare -rm``, so the mount is gone with it)::

    python tests/disk_full_driver.py MOUNTPOINT SIZE [ndo serve arguments...]

It mounts a tmpfs of ``SIZE`` (for example ``4m``) on ``MOUNTPOINT``, runs ``ndo serve`` with the
arguments given as a child (its output is this process's), and passes SIGTERM and SIGINT on to
it. Once the worker has exited it prints one JSON line, ``{"event": "driver: worker exited",
"code": N}``, and stays alive until its stdin closes, so the test can still read the tmpfs
through ``/proc/<pid>/root`` after the worker is gone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from types import FrameType


def main(argv: list[str]) -> int:
    """Mount, serve, report the worker's exit, wait for stdin to close."""
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    mountpoint, size, *serve_args = argv
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mountpoint], check=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "ndo.ops.cli", "serve", *serve_args], stdin=subprocess.DEVNULL
    )

    def forward(signum: int, _: FrameType | None) -> None:
        worker.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = worker.wait()
    print(json.dumps({"event": "driver: worker exited", "code": code}), flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
