"""``python -m s2meta_fast``: the same CLI as the ``s2meta`` console script."""
import sys

from .cli import main

sys.exit(main())
