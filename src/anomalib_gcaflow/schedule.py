"""MSFlow's per-epoch learning-rate schedule: linear warm-up from 0.1x, then step decay.

Follows MSFlow (Zhou et al., IEEE TNNLS 2024; code https://github.com/cool-xuan/msflow, MIT), whose recipe the
GCAFlow paper keeps.
"""

from collections.abc import Sequence


def warmup_step_factor(epoch: int, warmup_epochs: int, milestones: Sequence[int], gamma: float) -> float:
    """Return the learning-rate multiplier of ``epoch`` (0-based; the scheduler steps once per epoch).

    ``(0.1 + 0.9 * min(epoch, W) / W) * gamma ** (number of milestones <= epoch)``. With the paper's setting
    (W = 12, milestones 70 and 90, gamma 0.33) and lr 1e-4: 1e-5 at epoch 0, 1.75e-5 at 1, 1e-4 from 12,
    3.3e-5 from 70 and 1.089e-5 from 90.

    Args:
        epoch (int): Current epoch.
        warmup_epochs (int): Warm-up length W; 0 disables the warm-up.
        milestones (Sequence[int]): Epochs at which the rate is multiplied by ``gamma``.
        gamma (float): Decay factor.

    Returns:
        float: The multiplier of the base learning rate.
    """
    warmup = 1.0 if warmup_epochs <= 0 else 0.1 + 0.9 * min(epoch, warmup_epochs) / warmup_epochs
    return warmup * gamma ** sum(epoch >= milestone for milestone in milestones)
