"""`python -m gdn_jax.train ...` is `gdn-jax train ...`."""

import sys

from gdn_jax.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
