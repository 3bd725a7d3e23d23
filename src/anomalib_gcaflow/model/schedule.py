"""MSFlow's per-epoch learning-rate schedule (linear warm-up from 0.1x, then step decay), scaled to any budget.

MSFlow (Zhou et al., IEEE TNNLS 2024; code https://github.com/cool-xuan/msflow, MIT) and the GCAFlow paper train
100 epochs with 12 warm-up epochs and decay at epochs 70 and 90. Expressed as fractions of the budget (0.12, 0.7,
0.9), the same shape serves a 5- or 20-epoch run, and a 100-epoch run gets exactly the paper's epochs.
"""

from collections.abc import Sequence

PAPER_EPOCHS = 100
WARMUP_FRACTION = 0.12
MILESTONE_FRACTIONS = (0.7, 0.9)


def budget_schedule(
    budget: int,
    warmup_epochs: int | None = None,
    milestones: Sequence[int] | None = None,
) -> tuple[int, tuple[int, ...]]:
    """Return the warm-up length and the decay epochs of a ``budget``-epoch run.

    Args:
        budget (int): Number of training epochs, >= 1.
        warmup_epochs (int | None, optional): Explicit warm-up length; ``None`` takes 12 % of the budget.
            Defaults to ``None``.
        milestones (Sequence[int] | None, optional): Explicit decay epochs; ``None`` takes 70 % and 90 % of the
            budget. Defaults to ``None``.

    Returns:
        tuple[int, tuple[int, ...]]: ``(warmup_epochs, milestones)``; ``(12, (70, 90))`` for 100 epochs,
        ``(2, (14, 18))`` for 20, ``(1, (4, 5))`` for 5 (a milestone at the budget is never reached).

    Raises:
        ValueError: If ``budget`` is below 1.
    """
    if budget < 1:
        msg = f"the epoch budget of the learning-rate schedule must be >= 1, got {budget}"
        raise ValueError(msg)
    # Rounded half up, not to even: 3.5 -> 4 and 4.5 -> 5 keep the two decays apart at small budgets.
    if warmup_epochs is None:
        warmup_epochs = int(WARMUP_FRACTION * budget + 0.5)
    if milestones is None:
        milestones = tuple(int(fraction * budget + 0.5) for fraction in MILESTONE_FRACTIONS)
    return int(warmup_epochs), tuple(int(m) for m in milestones)


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
