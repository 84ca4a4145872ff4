"""`python -m refcount`: the same entry point as the console script."""

from refcount.client import run

run()
