"""Count the places in ``src/sparkmim`` that branch on the number of spatial dims; JSON lines.

    python benchmarks/dim_branches.py [--sites] [ROOT]

A site is a source line (comments and docstrings excluded) that decides something by asking
whether it holds images or volumes, in one of these spellings:

* ``dims``: a dimension count compared with 2 or 3 (``spatial_dims == 3``, ``n == 2``,
  ``len(patch) == 2``, ``spatial_dims_for(name) == 3``);
* ``rank``: a tensor rank compared with 4 or 5 (``x.dim() == 4``, ``arr.ndim == 5``);
* ``int_or_tuple``: a scale asked whether it is a tuple (``isinstance(factor, tuple)``);
* ``flag``: a ``volumes`` boolean tested or passed on;
* ``derive``: the modality worked out again from a model, its name or a tensor's rank
  (``spatial_dims_for(...)``, ``spatial_dims_of(...)``, ``model.spatial_dims`` read outside the
  model and the encoder, ``MODALITIES[...]`` looked up by a number of dims).

Every file is counted. Sites in the modules whose job is to decide the modality (``HOMES``) are
marked ``"home": true`` and counted apart (``in_homes``); ``total_sites`` counts them all. The
last line is the total. The same script on two commits gives the before and after counts.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tokenize
from pathlib import Path

SCALE = r"(factor|factors|stride|strides|patch|patch_size|size|sizes|kernel|a|s|f|fo|step|up|value)"
PATTERNS = {
    "dims": re.compile(r"(spatial_dims\w*(\([^)]*\))?|\bn|\blen\((self\.)?(sizes|patch|grid|shape|factors?|strides?|size)\))\s*(==|!=)\s*[23]\b|\b[23]\s*(==|!=)\s*"
                       r"(spatial_dims|n\b)"),
    "rank": re.compile(r"(\.dim\(\)|\.ndim)\s*(==|!=)\s*[45]\b|(\.dim\(\)|\.ndim)\s+(not )?in\s*\(4, 5\)"),
    "int_or_tuple": re.compile(rf"isinstance\({SCALE},\s*tuple\)"),
    "flag": re.compile(r"\bif (not )?(self\.)?volumes\b|\bvolumes=volumes\b|\bif volumes else\b|"
                       r"\bvolumes\s*=\s*(spatial|model|rec|self|cfg)"),
    "derive": re.compile(r"spatial_dims_(for|of)\(|(?<!self)\bmodel\.spatial_dims\b|\.encoder\.spatial_dims\b|"
                         r"\bMODALITIES\["),
}
# where deciding the modality is the job itself (the value decided once, the model's own field)
HOMES = {"features.py", "backbones.py", "modality.py"}


def code_lines(path: Path) -> dict[int, str]:
    """Each line's code with comments and string literals blanked (docstrings do not count)."""
    src = path.read_text()
    lines = src.splitlines()
    keep = {i + 1: line for i, line in enumerate(lines)}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):
                a = c0 if r == r0 else 0
                b = c1 if r == r1 else len(keep[r])
                keep[r] = keep[r][:a] + " " * (b - a) + keep[r][b:]
    return keep


def sites(root: Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for number, line in code_lines(path).items():
            kinds = [k for k, p in PATTERNS.items() if p.search(line)]
            if kinds:
                yield {"file": rel, "line": number, "kinds": kinds, "code": " ".join(line.split()),
                       "home": path.name in HOMES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1] / "src" / "sparkmim"))
    ap.add_argument("--sites", action="store_true", help="print every site, not only the counts per file")
    args = ap.parse_args()
    found = list(sites(Path(args.root)))
    per_file: dict[str, int] = {}
    for s in found:
        per_file[s["file"]] = per_file.get(s["file"], 0) + 1
        if args.sites:
            print(json.dumps(s))
    for f, n in sorted(per_file.items(), key=lambda kv: -kv[1]):
        print(json.dumps({"file": f, "sites": n}))
    kinds: dict[str, int] = {}
    for s in found:
        for k in s["kinds"]:
            kinds[k] = kinds.get(k, 0) + 1
    print(json.dumps({"total_sites": len(found), "in_homes": sum(s["home"] for s in found),
                      "outside_homes": sum(not s["home"] for s in found), "files": len(per_file), "by_kind": kinds}))


if __name__ == "__main__":
    main()
