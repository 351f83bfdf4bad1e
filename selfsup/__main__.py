import sys

from selfsup.platform.cli import main

sys.exit(main())
