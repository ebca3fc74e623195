"""Citations in the code point inside the repository: every docs link (file and anchor) exists, and no
comment cites the external design spec by section."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("megavod", "tests", "benchmarks", "scripts") for p in (ROOT / folder).rglob("*")
           if p.suffix in (".py", ".yaml", ".md", ".sh")] + [ROOT / "README.md"]


def anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    out = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            out.add(title.replace(" ", "-"))
    return out


def test_docs_citations_resolve():
    docs = {p.name: anchors(p) for p in (ROOT / "docs").glob("*.md")}
    assert {"architecture.md", "conventions.md", "departures.md", "authors_code.md"} <= set(docs)
    broken = []
    for path in SOURCES:
        for m in re.finditer(r"docs/([\w.-]+\.md)(?:#([\w-]+))?", path.read_text(encoding="utf-8")):
            name, anchor = m.groups()
            if name not in docs or (anchor and anchor not in docs[name]):
                broken.append(f"{path.relative_to(ROOT)}: docs/{name}{'#' + anchor if anchor else ''}")
    assert not broken, "\n".join(broken)


def test_benchmark_citations_resolve():
    """Citations of benchmarks/README.md's sections (code comments and docs cite measurements there)."""
    sections = anchors(ROOT / "benchmarks" / "README.md")
    broken = [f"{path.relative_to(ROOT)}: #{m.group(1)}"
              for path in SOURCES + sorted((ROOT / "docs").glob("*.md"))
              for m in re.finditer(r"benchmarks/README\.md#([\w-]+)", path.read_text(encoding="utf-8"))
              if m.group(1) not in sections]
    assert not broken, "\n".join(broken)


def test_no_citation_of_the_external_spec():
    cited = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\bspec\s*§", line, re.I)]
    assert not cited, "\n".join(cited)


def _readme_synopsis() -> dict[str, str]:
    """README "Command line"'s synopsis block: per subcommand, its lines joined (continuations are indented)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    out: dict[str, str] = {}
    command = None
    for line in block.splitlines():
        if line.startswith("megavod "):
            command = line.split()[1]
            out[command] = line
        elif line.strip() and command is not None:
            out[command] += " " + line.strip()
    return out


def test_readme_synopsis_lists_every_cli_option():
    """Every subcommand of ``megavod`` and every option it accepts (``--help`` aside) appear in README's
    synopsis, so the synopsis cannot fall behind the parser."""
    import argparse

    from megavod.apps.cli import build_parser

    synopsis = _readme_synopsis()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, parser in sub.choices.items():
        if name not in synopsis:
            missing.append(f"megavod {name}")
            continue
        words = set(re.findall(r"--[\w-]+", synopsis[name]))
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            if longs and not words & set(longs):
                missing.append(f"megavod {name} {longs[0]}")
    assert not missing, "README's command-line synopsis lacks: " + ", ".join(missing)
    assert set(synopsis) <= set(sub.choices), set(synopsis) - set(sub.choices)


def test_nothing_is_downloaded():
    """README: "Nothing is ever downloaded". No module of the package reaches the network: no network
    library, no torch.hub or torchvision download helper, and torchvision's model builders get
    ``weights=None``."""
    network = re.compile(r"^\s*(?:import|from)\s+(?:urllib|requests|http|socket|ftplib)\b|torch\.hub|"
                         r"load_state_dict_from_url|download_url|download_and_extract", re.M)
    builder = re.compile(r"\b(?:raft_small|raft_large|resnet\d+|resnext\w+)\(([^)]*)\)")
    found = []
    for path in sorted((ROOT / "megavod").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for m in network.finditer(text)]
        found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in builder.finditer(text)
                  if "weights=None" not in m.group(1) and "import" not in m.group(0)]
    assert not found, "\n".join(found)
