"""The README and docs/: self-contained (nothing points outside the repository, every path they name
exists) and true to the commands (every `moela ...` line in the README parses with today's flags)."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PRODUCT = DOCS + [p for p in (ROOT / "moela").rglob("*") if p.suffix in (".py", ".md", ".json") and p.is_file()]


def bash_lines(text: str) -> list[str]:
    """Commands in ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_points_outside_the_repository(path):
    text = path.read_text(encoding="utf-8", errors="ignore")
    for outside in ("../shared", "shared/docs", "PERF-ANCHORS", "ARCHITECTURE-SPEC", "SERVING-CHECKLIST"):
        assert outside not in text, f"{path.name} refers to {outside}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_doc_names_exists(doc):
    text = doc.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    named = re.findall(r"`((?:moela|bench|docs|tests|\.ci)/[\w./-]+)`", text)
    for target in links + named:
        if target.startswith(("http://", "https://")) or "*" in target or "<" in target:
            continue
        base = doc.parent if target in links and not target.startswith(("moela/", "bench/", "docs/", "tests/")) else ROOT
        assert (base / target).exists() or (ROOT / target).exists(), f"{doc.name} names {target}, which does not exist"


def test_readme_opens_with_the_two_setup_commands():
    first = bash_lines((ROOT / "README.md").read_text())[:2]
    assert first[0].startswith("pip install torch==2.13.0 && pip install -e . && moela generate")
    assert first[1] == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    assert (ROOT / ".ci" / "run").read_text().strip().endswith(first[1])


def parse(argv: list[str]) -> None:
    from moela import bench, cli, convert, export, placement_cli
    from moela.cost import cli as cost_cli
    from moela.server import cli as serve_cli
    from moela.train import cli as train_cli

    command, rest = argv[0], argv[1:]
    parsers = {"serve": serve_cli.parse_args, "train": train_cli.parse_args, "cost": cost_cli._parser().parse_args,
               "bench": bench.parser().parse_args, "plan-experts": placement_cli.parse_args, "export": export.parse_args,
               "convert": convert.parse_args}
    (parsers[command] if command in parsers else cli.parser().parse_args)(rest if command in parsers else argv)


def test_every_readme_command_parses():
    for line in bash_lines((ROOT / "README.md").read_text()):
        for command in line.split("&&"):
            argv = shlex.split(command)
            if argv[0] == "moela":
                parse(argv[1:])
            elif argv[0] == "python" and argv[1].startswith("bench/"):
                assert (ROOT / argv[1]).is_file(), argv[1]
            elif argv[:3] == ["torchrun", "--nproc-per-node", "2"]:
                from moela.train import cli as train_cli

                train_cli.parse_args(argv[5:])
            else:
                assert argv[0] in ("pip", "curl") or argv[:3] == ["python", "-m", "pytest"], f"unknown command: {command}"
