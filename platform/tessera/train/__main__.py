"""`python -m tessera.train ARGS` is `tessera train ARGS`: what torchrun and the deepspeed launcher start."""

import sys

from tessera.cli import main

sys.argv = ["tessera", "train", *sys.argv[1:]]
main()
