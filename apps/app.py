"""The rating app: ``python apps/app.py [--model ...] [--adapter ...] [--db PATH] [--auth FILE] ...``.

Same flags as ``diffpref app --help``; the app itself lives in ``diffpref.app.server``.
"""

import sys

from diffpref.app.server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
