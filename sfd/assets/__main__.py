"""`python -m sfd.assets ...`: see sfd.assets.cli."""
import sys

from sfd.assets.cli import main

sys.exit(main())
