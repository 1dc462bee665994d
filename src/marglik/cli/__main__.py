import sys

from marglik.cli import main

sys.exit(main())
