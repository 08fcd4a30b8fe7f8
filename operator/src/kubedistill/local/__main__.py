"""`python -m kubedistill.local {baseline | convert}`: local mode's own child processes."""

import sys

from kubedistill.local import main

sys.exit(main())
