"""`python -m serving.devserver`: see `serving.devserver.cli`."""

import sys

from serving.devserver.cli import main

sys.exit(main())
