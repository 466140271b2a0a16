"""DAD: distributional-discrepancy-based adversarial defense, pure PyTorch core.

One learned statistic (MMD-OPT, a deep-kernel maximum mean discrepancy) is trained to separate clean
from adversarial images, then used twice: as the training signal of a denoiser and as a batch-level
detector that routes suspicious batches through that denoiser. This package never imports Lightning.
"""

__version__ = "0.1.0"
