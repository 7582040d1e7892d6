"""The serving engine lives in `xcomposer.engine` (a package: pool, scheduler, runner, sampler);
this name is kept for the front doors and for code written against it."""
from ..engine import *  # noqa: F401,F403
from ..engine import __all__  # noqa: F401
