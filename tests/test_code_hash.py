"""The model-code hash keys the compare cache and the Ray engine's node check: it must follow the code's
content and the module names, never the paths where Python happens to install them (cluster nodes differ)."""

import importlib.util
import sys

from relprop.specs.hashing import module_code_hash

SOURCE = """
import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
    def forward(self, x):
        return self.fc(x){tail}
"""


def _hashes(folder, tail=""):
    """(hash of the class's code, hash with the file as an extra file), the module imported from ``folder``."""
    folder.mkdir(parents=True)
    path = folder / "hashnet_mod.py"
    path.write_text(SOURCE.format(tail=tail))
    spec = importlib.util.spec_from_file_location("hashnet_mod", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hashnet_mod"] = mod  # inspect finds a class's file through its module
    try:
        spec.loader.exec_module(mod)
        net = mod.Net()
        return module_code_hash(net), module_code_hash(net, (str(path),))
    finally:
        del sys.modules["hashnet_mod"]


def test_same_code_at_other_paths_hashes_alike(tmp_path):
    assert _hashes(tmp_path / "node_a" / "site-packages") == _hashes(tmp_path / "elsewhere" / "lib")


def test_edited_code_hashes_differently(tmp_path):
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b", tail=" * 2")
    assert a[0] != b[0] and a[1] != b[1]
