import sys

from refcount.cli import main

sys.exit(main(sys.argv[1:]))
