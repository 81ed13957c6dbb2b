import sys

from mimkit.cli import main

sys.exit(main())
