"""Where the data tests find the repository's example datasets and the shared real ones."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "data"
# Real datasets beside the repository (not in it); tests using them skip when it is absent.
SHARED_DATA = REPO.parent / "shared" / "data"
