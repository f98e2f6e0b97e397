"""Test set-up. Triton runs through its CPU interpreter here: the variable must be set
before anything imports triton, so it is set at collection time when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
