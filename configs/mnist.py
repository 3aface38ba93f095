"""The mnist config ships inside the package: nfjax/configs/mnist.py (its presets and keys are documented
there). `--config=mnist:PRESET` finds it from any directory; this file keeps
`--config=configs/mnist.py:PRESET` (and `import mnist` from this folder) working in a checkout."""

from nfjax.configs.mnist import *  # noqa: F401,F403
from nfjax.configs.mnist import get_config  # noqa: F401
