"""sftrl: shortcut fine-tuning of diffusion samplers by policy gradient (SFT-PG) on Ray.

Importing sftrl registers the Gymnasium env ``sftrl/DenoisingChain-v0``.
"""

import sftrl_envs  # noqa: F401  (registers the denoising-chain envs)

__version__ = "0.1.0"
