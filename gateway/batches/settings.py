"""What the batch rules are told of the configuration: a few typed values, not the whole Config."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Batches, Config, Mode, OnStoreError, UnknownBatch


@dataclass(frozen=True)
class RuleSettings:
    mode: Mode = Mode.STRICT
    unknown_batch: UnknownBatch = UnknownBatch.VERIFY
    on_store_error: OnStoreError = OnStoreError.REJECT
    commit_fence_timeout: float = 5.0  # seconds
    batches: Batches = Batches.ENTERPRISE

    @property
    def engine(self) -> bool:
        """The gateway keeps the batches itself (in front of Faktory OSS)."""
        return self.batches == Batches.GATEWAY

    @classmethod
    def of(cls, config: Config) -> RuleSettings:
        return cls(
            config.mode,
            config.unknown_batch,
            config.on_store_error,
            config.commit_fence_timeout,
            config.batches,
        )
