"""The one error type that ``prepare`` raises for bad input data."""

from __future__ import annotations


class PrepareError(Exception):
    """Malformed or unusable input data, located as precisely as possible.

    Attributes:
        file: The input file (or folder / archive member) the problem is in.
        row: Where in ``file``: the 1-based line number for header-less text files
            (``ratings.dat``, ``u.data``, ``ml-1m-sequences.txt``), the 1-based *data*
            row (header not counted) for CSV and Parquet tables, or ``None`` when the
            problem concerns the file as a whole.
        problem: What is wrong, in words a user can act on.

    ``str(error)`` is ``"{file}:{row}: {problem}"``, or ``"{file}: {problem}"`` when
    ``row`` is ``None``, like compiler messages, so editors and terminals can jump to it.
    """

    def __init__(self, file: str, row: int | None, problem: str) -> None:
        self.file = str(file)
        self.row = row
        self.problem = problem
        super().__init__(file, row, problem)

    def __str__(self) -> str:
        if self.row is None:
            return f"{self.file}: {self.problem}"
        return f"{self.file}:{self.row}: {self.problem}"
