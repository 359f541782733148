"""`python -m sfd.bench ...`: see sfd.bench.cli."""
import sys

from sfd.bench.cli import main

sys.exit(main())
