"""Rewrite README.md's method configuration reference from the config classes' JSON schemas.

The reference sits between `<!-- methods:start -->` and `<!-- methods:end -->`; a test checks that
running this script changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from compression.method_docs import update_readme

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    README.write_text(update_readme(README.read_text()))


if __name__ == "__main__":
    main()
