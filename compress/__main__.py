"""python -m compress [info] ...: see compress/cli.py."""
import sys

from compress.cli import main

if __name__ == "__main__":
    sys.exit(main())
