"""Where each input's items lie once every PDF input stands as its pages, in one flat list.

A request's inputs become engine items one for one, except a PDF, which becomes one image per
selected page, in place. :class:`PageLayout` is that mapping, written once: which input a flat
position came from (to name it in errors), and each input's slice of the flat results (to
answer it, or score it as its best page).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["InputSpan", "PageLayout"]


@dataclass(frozen=True, slots=True)
class InputSpan:
    """One input's items in the flat list; ``pages`` are a PDF's page numbers (None otherwise)."""

    index: int
    start: int
    stop: int
    pages: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class PageLayout:
    """The flat layout of ``inputs`` inputs, of which those in ``pages`` are PDFs (input -> page numbers)."""

    inputs: int
    pages: Mapping[int, Sequence[int]] = field(default_factory=dict)

    @classmethod
    def of_flat(cls, flat: int, pages: Mapping[int, Sequence[int]]) -> PageLayout:
        """The layout of a flat list of ``flat`` items (each PDF's pages counted in it)."""
        return cls(flat - sum(len(numbers) - 1 for numbers in pages.values()), pages)

    def spans(self) -> Iterator[InputSpan]:
        """Every input's span, in input order."""
        position = 0
        for index in range(self.inputs):
            numbers = self.pages.get(index)
            count = 1 if numbers is None else len(numbers)
            yield InputSpan(index, position, position + count, None if numbers is None else tuple(numbers))
            position += count

    def owners(self) -> list[int]:
        """The input of every flat position."""
        return [span.index for span in self.spans() for _ in range(span.stop - span.start)]
