"""``python -m sorsa_kernels`` runs the ``sorsa-kernels`` command line."""
import sys

from .cli import main

sys.exit(main())
