import sys

from sockd.cli import main

sys.exit(main())
