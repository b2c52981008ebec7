"""The built documentation documents every public name: each of cpuattn.__all__, of
cpuattn.plot's public functions and (with torch installed) of cpuattn.torch.__all__ has an
entry in the HTML's general index."""

import inspect
import sys
from pathlib import Path

import cpuattn
import cpuattn.plot

html = Path(sys.argv[1])
index = (html / "genindex.html").read_text(encoding="utf-8")
public = [f"cpuattn.{name}" for name in cpuattn.__all__ if name != "__version__"]
public += [
    f"cpuattn.plot.{name}"
    for name, obj in vars(cpuattn.plot).items()
    if not name.startswith("_") and inspect.isfunction(obj) and obj.__module__ == "cpuattn.plot"
]
try:
    import cpuattn.torch
except ImportError:  # no torch: its page documents stand-ins
    pass
else:
    public += [f"cpuattn.torch.{name}" for name in cpuattn.torch.__all__]
# An index entry links to the object's anchor, whatever page holds it: href="...#cpuattn.name".
missing = [name for name in public if f'#{name}"' not in index]
assert not missing, f"not in the docs' index: {missing}"
print(f"docs index has all {len(public)} public names")
