import sys

from chunkwatch.doctor.cli import main

sys.exit(main())
