"""Imported in the zygote by a test: makes torch report an initialised CUDA context."""

import torch

torch.cuda.is_initialized = lambda: True
