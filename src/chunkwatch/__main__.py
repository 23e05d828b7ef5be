import sys

from chunkwatch.cli import main

sys.exit(main())
