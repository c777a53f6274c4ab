import sys

from hf_tuningfree.compare import main

sys.exit(main())
