"""sftrl: shortcut fine-tuning of diffusion samplers by policy gradient (SFT-PG) on Ray.

Importing sftrl registers the Gymnasium env ``sftrl/DenoisingChain-v0``.
"""

import os

# The same weights must give the rollout worker and the learner the same log-prob of the same
# transition, though the worker scores it in a batch of chains and the learner in a batch of
# buffer samples. MKL's CPU GEMM picks kernels by the batch size (on AVX-512 machines rows of a
# batch under 16 round differently from the same rows in a larger one: 83 of 384 shapes probed);
# its strict Conditional Numerical Reproducibility mode makes every row's result independent of
# the batch, at no measured cost (0.12 ms per 640x128x128 product either way). MKL reads the
# setting at its first call, so it is set on import, before any tensor work; a user's own
# MKL_CBWR is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import sftrl_envs  # noqa: E402, F401  (registers the denoising-chain envs)

__version__ = "0.1.0"
