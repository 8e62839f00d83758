import sys
from pathlib import Path

# The tests import small shared modules (tests/toys.py) by name.
sys.path.insert(0, str(Path(__file__).parent))
