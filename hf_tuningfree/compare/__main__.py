import sys

from hf_tuningfree.compare.cli import main

sys.exit(main(exiting=True))
