"""``python -m tag2mask`` (also how ``torchrun ... -m tag2mask`` starts every rank)."""

import os
import sys

from tag2mask.cli.main import main


def _exit(code: int) -> None:
    """Exit with ``code``. Under torchrun, a rank other than 0 leaves without the interpreter's teardown:
    its outputs are written and closed by now, and torchrun stops the ranks still alive as soon as one
    exits non-zero (rank 0's "some items failed" exit code would otherwise race a slow teardown here)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    _exit(main())
