import sys
from pathlib import Path

# Let test modules import the shared helpers next to them (``import model_zoo``).
sys.path.insert(0, str(Path(__file__).parent))
