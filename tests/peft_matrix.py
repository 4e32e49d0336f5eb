"""Print the PEFT methods x model families matrix: ``python -m tests.peft_matrix``.

Runs the contract of tests/test_peft_contract.py on every cell and prints which work and
which raise a clear ``FtlabError`` (and why); a cell that breaks the contract prints FAIL.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.test_peft_contract import FAMILIES, METHODS, format_matrix, run_cell


def main() -> None:
    matrix: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            for name in METHODS:
                try:
                    matrix[(family, name)] = run_cell(family, name, Path(tmp))
                except BaseException as err:  # noqa: BLE001  (pytest.fail is a BaseException)
                    matrix[(family, name)] = f"error: FAIL {type(err).__name__}: {err}"
    print(format_matrix(matrix))


if __name__ == "__main__":
    main()
