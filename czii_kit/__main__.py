import sys

from czii_kit.cli import main

sys.exit(main())
