import sys

from chubbyfs.cli import main

sys.exit(main())
