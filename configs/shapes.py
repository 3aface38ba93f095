"""The shapes config ships inside the package: nfjax/configs/shapes.py (its presets and keys are documented
there). `--config=shapes:PRESET` finds it from any directory; this file keeps
`--config=configs/shapes.py:PRESET` (and `import shapes` from this folder) working in a checkout."""

from nfjax.configs.shapes import *  # noqa: F401,F403
from nfjax.configs.shapes import get_config  # noqa: F401
