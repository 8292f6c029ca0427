"""``python -m checkpoints {convert,verify} ...`` - same as ``python -m checkpoints.<cmd>``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in ("convert", "verify"):
    print(
      "usage: python -m checkpoints {convert,verify} [--help]\n"
      "  convert  PyTorch state dict -> orbax checkpoint (python -m checkpoints.convert)\n"
      "  verify   parity check against a fixture (python -m checkpoints.verify)",
      file=sys.stderr,
    )
    return 2
  if argv[0] == "convert":
    from checkpoints.convert import main as run
  else:
    from checkpoints.verify import main as run
  return run(argv[1:])


if __name__ == "__main__":
  sys.exit(main())
