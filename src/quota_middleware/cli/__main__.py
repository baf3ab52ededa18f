"""``python -m quota_middleware.cli``."""

import sys

from quota_middleware.cli import main

if __name__ == "__main__":
    sys.exit(main())
