"""``python -m experiments.peers``: which implementations are usable here, and why the others are not."""

import sys

from experiments.peers import availability


def main() -> int:
    for name, status in availability().items():
        print(f"{name:22s} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
