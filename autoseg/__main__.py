"""`python -m autoseg ...` (what torchrun launches)."""
import sys

from autoseg.cli import main

sys.exit(main())
