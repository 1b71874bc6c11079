#!/usr/bin/env python
"""Command-line wrapper; the benchmark and its documentation live in erc_verl/bench/entropy.py."""

import sys

from erc_verl.bench.entropy import main

if __name__ == "__main__":
    sys.exit(main())
