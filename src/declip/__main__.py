import sys

from declip.cli import main

sys.exit(main())
