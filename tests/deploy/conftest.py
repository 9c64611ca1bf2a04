"""The deploy/ tests share the parsed manifests through `manifest_support`."""

from __future__ import annotations

import sys
from pathlib import Path

# Test modules are imported with --import-mode=importlib: make `import manifest_support` work.
sys.path.insert(0, str(Path(__file__).parent))
