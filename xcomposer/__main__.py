"""`python -m xcomposer ...`: see `xcomposer.cli`."""
from .cli import main

raise SystemExit(main())
