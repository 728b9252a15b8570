"""A tqdm bar as a store `Progress`, for commands a person waits on."""

from __future__ import annotations

from types import TracebackType

from tqdm import tqdm


class TqdmProgress:
    """Byte progress on stderr; silent when stderr is not a terminal (CI logs, pods)."""

    def __init__(self, description: str) -> None:
        self._bar = tqdm(
            total=0, desc=description, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False
        )

    def begin(self, total_bytes: int) -> None:
        self._bar.total = (self._bar.total or 0) + total_bytes
        self._bar.refresh()

    def update(self, nbytes: int) -> None:
        self._bar.update(nbytes)

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._bar.close()
