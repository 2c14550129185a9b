"""`python -m gdn_jax.train ...`: training's own entry point (`gdn-jax train ...` reaches it)."""

import sys

from gdn_jax.train.command import main

sys.exit(main())
