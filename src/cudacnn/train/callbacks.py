"""Small pieces of run control with their own state (saved in checkpoints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    """Stop when validation accuracy has not improved for `patience` epochs."""

    patience: int
    best: float = float("-inf")
    bad_epochs: int = 0

    def update(self, value: float) -> bool:
        """Record an epoch's value; True when it is a new best."""
        if value > self.best:
            self.best, self.bad_epochs = value, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
