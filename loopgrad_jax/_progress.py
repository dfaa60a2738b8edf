"""The stand-in for a tqdm progress bar when none is shown (``--no-progress``)."""

from __future__ import annotations


class NoBar:
    """Takes a progress bar's calls and shows nothing; tqdm is then never imported."""

    def set_description(self, text: str) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
