#!/usr/bin/env python
"""Spatial control of a frozen 3D latent diffusion model: the benchmark. See README.md."""
import sys

from benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
