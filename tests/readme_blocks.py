"""The client set-up README.md gives, read back so tests run exactly what it tells people."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION = "## Client set-up"
DOCUMENTED_URL = "http://127.0.0.1:2455"


def client_setup() -> str:
    """The "Client set-up" section of README.md."""
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end != -1 else len(text)]


def code_block(language: str) -> str:
    """The one fenced ``language`` block of the section."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", client_setup(), re.M | re.S)
    assert len(blocks) == 1, f"expected one {language} block in {SECTION}, found {len(blocks)}"
    return str(blocks[0])


def pointed_at(block: str, url: str) -> str:
    """The block with codex-lb's documented address replaced by ``url``."""
    assert DOCUMENTED_URL in block
    return block.replace(DOCUMENTED_URL, url)
