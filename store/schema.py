"""Print the database schema produced by the migrations: python -m store.schema > docs/schema.sql"""

import sys
import tempfile
from pathlib import Path

from .store import Store

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        sys.stdout.write(Store(Path(d) / "schema.db").schema())
