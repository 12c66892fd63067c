"""The docs claim only what exists: every Python block of README.md and docs/ runs, the README's quick
start commands run, and the files the pages name are there.

How a page's code blocks are run (also in docs/index.md, "Code blocks on these pages"):

- every ```python block runs, with a fresh temporary folder as the working directory;
- a block whose first line is `# continued from the block above` runs after the page's previous block,
  in the same namespace;
- a block (of any language) whose first line is `# <relative path>` of a file, e.g. `# mymod/backbone.py`,
  is a file of an example package: it is written to that path in the temporary folder (which is on
  `sys.path`) before the page's blocks run; a Python file under `tests/` has its `test_*` functions
  called, another is imported;
- a block whose first line is `# not run by tests/test_docs.py: <reason>` is not run: the reason is
  visible on the page, and `test_blocks_not_run_are_few_and_named` lists every such block;
- paths of weights and files a reader has and this machine has not (a Stable Diffusion folder, a CLIP
  folder, a run folder the page's commands make) are mapped to tiny random-weight stand-ins or to small
  runs made here (`SETUP`, per page), never skipped.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import QUIET, REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
FILE_LINE = re.compile(r"^# ([\w.-]+(?:/[\w.-]+)*\.(?:py|yaml|yml|json|smi))\s*$")
NOT_RUN = re.compile(r"^# not run by tests/test_docs\.py: (.+)$")
CONTINUED = "# continued from the block above"

#: blocks marked not run, with the reason the page shows (the list stays short)
EXPECTED_NOT_RUN = {
    "docs/score.md#4": "a template: `read_wav` is yours",
}


@dataclass
class Block:
    page: str  # path relative to the repository
    index: int  # among the page's fenced blocks
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}#{self.index}"

    @property
    def first_line(self) -> str:
        return self.code.split("\n", 1)[0].strip()

    @property
    def file(self) -> str | None:
        m = FILE_LINE.match(self.first_line)
        return m.group(1) if m else None

    @property
    def not_run(self) -> str | None:
        m = NOT_RUN.match(self.first_line)
        return m.group(1) if m else None


def page_blocks(page: Path) -> list[Block]:
    rel = page.relative_to(REPO).as_posix()
    return [Block(rel, i, lang, code) for i, (lang, code) in enumerate(FENCE.findall(page.read_text()))]


BLOCKS = [b for p in PAGES for b in page_blocks(p)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
RUN = [b for b in PYTHON if b.not_run is None and b.file is None]
FILES = [b for b in BLOCKS if b.file is not None]


# ---------------------------------------------------------------------------------------------------
# What a page's blocks expect to find (made here, small), and the placeholder paths mapped onto it
# ---------------------------------------------------------------------------------------------------
def _toy_run(tmp: Path) -> dict[str, str]:
    """quickstart.md reads the run folder of `diffalign fit --config recipes/toy/ddpo_mode.yaml`."""
    from diffalign.core.cli import cli_main

    tiny = ["--trainer.max_epochs=2", "--data.init_args.batches_per_epoch=1"]
    cli_main(["fit", "--config", "toy/ddpo_mode", "--run_root", str(tmp / "runs"), *QUIET, *tiny])
    return {}


def _toy_samples(tmp: Path) -> dict[str, str]:
    """sample.md reads the output folder of `diffalign sample --config recipes/toy/sample_fk.yaml`."""
    from diffalign.core.cli import cli_main

    out = tmp / "s"
    assert cli_main(["sample", "--config", "toy/sample_fk", "--output", str(out), "--progress", "false"]) == 0
    return {"/tmp/s/": f"{out}/"}


def _stable_diffusion(tmp: Path) -> dict[str, str]:
    """stable_diffusion.md: a tiny random SD 1.5-layout folder for `/data/stable-diffusion-v1-5`, and a
    checkpoint of the LoRA recipe's layout (`policy.backbone.*` adapter weights) where the page reads one."""
    import torch

    from diffalign.core.lora import LoRABackbone
    from diffalign.modalities.image.stable_diffusion import StableDiffusionBackbone, make_tiny_sd_pipeline

    sd = make_tiny_sd_pipeline(tmp / "sd15")
    lora = LoRABackbone(StableDiffusionBackbone(str(sd), resolution=16), rank=4, alpha=4)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.normal_(0, 0.02)  # trained adapters are not zero
    ckpt = tmp / "runs" / "sd15_ddpo_aesthetic" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    state = {f"policy.backbone.{k}": v for k, v in lora.state_dict().items() if "lora_" in k}
    torch.save({"state_dict": state}, ckpt)
    return {"/data/stable-diffusion-v1-5": str(sd)}


def _clip(tmp: Path) -> dict[str, str]:
    """rewards/image_models.md: a tiny random CLIPModel folder for `/data/clip-vit-base-patch32`."""
    from tests.helpers import make_tiny_clip_folder

    return {"/data/clip-vit-base-patch32": str(make_tiny_clip_folder(tmp / "clip"))}


def _smiles_files(tmp: Path) -> dict[str, str]:
    """score.md scores `mols.smi`, `big.smi` and a folder `digits/` of PNGs with its prompts.csv."""
    import numpy as np
    from PIL import Image

    digits = tmp / "digits"
    digits.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(digits / f"{i}.png")
    prompts = ["a handwritten 3", "a handwritten 7", "a handwritten 0"]
    rows = "".join(f"{i}.png,{p}\n" for i, p in enumerate(prompts))
    (digits / "prompts.csv").write_text("file,prompt\n" + rows)
    (tmp / "mols.smi").write_text("CC(=O)Oc1ccccc1C(=O)O aspirin\nCCO ethanol\nnot-a-smiles bad\n")
    (tmp / "big.smi").write_text(
        "".join(f"{s} m{i}\n" for i, s in enumerate(["CCO", "c1ccccc1", "CCN"] * 10))
    )
    return {}


SETUP: dict[str, Callable[[Path], dict[str, str]]] = {
    "docs/quickstart.md": _toy_run,
    "docs/sample.md": _toy_samples,
    "docs/stable_diffusion.md": _stable_diffusion,
    "docs/rewards/image_models.md": _clip,
    "docs/score.md": _smiles_files,
}
#: blocks that take more than a few seconds (tiny Stable Diffusion, RDKit conformers, a CLI run)
SLOW = {
    "docs/stable_diffusion.md",
    "docs/modalities/molecule.md",
    "docs/rewards/molecule.md",
    "docs/quickstart.md",
}


def _write_files(page: str, folder: Path) -> list[Path]:
    written = []
    for b in FILES:
        if b.page == page:
            path = folder / b.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(b.code)
            written.append(path)
    return written


def _chain(block: Block) -> list[Block]:
    """The block, preceded by the blocks it continues."""
    chain = [block]
    while chain[0].first_line == CONTINUED:
        earlier = [b for b in RUN if b.page == block.page and b.index < chain[0].index]
        assert earlier, f"{chain[0].id} says it continues a block, but no runnable block comes before it"
        chain.insert(0, earlier[-1])
    return chain


@pytest.fixture
def docs_folder(tmp_path, monkeypatch):
    """A fresh working folder on sys.path; example-package modules written there are forgotten after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        mod = sys.modules[name]
        if str(getattr(mod, "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


def _params(blocks: list[Block]) -> list:
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.page in SLOW else []) for b in blocks]


@pytest.mark.parametrize("block", _params(RUN))
def test_python_block_runs(block: Block, docs_folder: Path) -> None:
    _write_files(block.page, docs_folder)
    mapping = SETUP[block.page](docs_folder) if block.page in SETUP else {}
    namespace: dict = {"__name__": "__docs__"}
    for b in _chain(block):
        code = b.code
        for placeholder, real in mapping.items():
            code = code.replace(placeholder, real)
        exec(compile(code, b.id, "exec"), namespace)


@pytest.mark.parametrize("block", _params([b for b in FILES if b.file.endswith(".py")]))
def test_example_file_imports_and_its_tests_pass(block: Block, docs_folder: Path) -> None:
    _write_files(block.page, docs_folder)
    path = docs_folder / block.file
    name = "_docs_" + re.sub(r"\W", "_", block.file[:-3])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if block.file.startswith("tests/"):
        tests = [getattr(module, n) for n in dir(module) if n.startswith("test_")]
        assert tests, f"{block.id} is a test file without test functions"
        for test in tests:
            test()


def test_blocks_not_run_are_few_and_named() -> None:
    marked = {b.id: b.not_run for b in BLOCKS if b.not_run is not None}
    assert marked == EXPECTED_NOT_RUN
    assert len(marked) <= 3, "make blocks runnable (or map their paths to stand-ins) instead of marking them"


def test_every_page_has_its_blocks_collected() -> None:
    """A stray fence would swallow the rest of a page: every page has an even number of ``` lines."""
    for page in PAGES:
        fences = [ln for ln in page.read_text().splitlines() if ln.lstrip().startswith("```")]
        assert len(fences) % 2 == 0, f"{page.relative_to(REPO)} has an unclosed code fence"
    assert len(RUN) >= 15, [b.id for b in RUN]


# ---------------------------------------------------------------------------------------------------
# The pages name files that exist
# ---------------------------------------------------------------------------------------------------
PATH = re.compile(r"(?<![\w/.-])((?:core|modalities|rewards|recipes|benchmarks|tests|docs)/[\w./-]*\w)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
#: paths a page mentions that are made by a command, not shipped
MADE_BY_COMMANDS = ("benchmarks/results/throughput_cuda_",)


def test_paths_and_links_named_in_docs_exist() -> None:
    missing = []
    for page in PAGES:
        text = page.read_text()
        examples = {b.file for b in FILES if b.page == page.relative_to(REPO).as_posix()}
        for m in PATH.finditer(text):
            p = m.group(1).rstrip(".")
            pattern = any(c in text[m.end(1) : m.end(1) + 2] for c in "*{<")  # e.g. recipes/x/sample_*.yaml
            if pattern or p in examples or p.startswith(MADE_BY_COMMANDS):
                continue
            if not any(
                (root / p).exists() or (root / p).with_suffix("").exists() for root in (REPO, page.parent)
            ):
                missing.append(f"{page.relative_to(REPO)}: {p}")
        for m in LINK.finditer(text):
            target = m.group(1)
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(REPO)}: link {target}")
    assert not missing, "\n".join(missing)


# ---------------------------------------------------------------------------------------------------
# README: the make targets and the quick start commands
# ---------------------------------------------------------------------------------------------------
README = REPO / "README.md"
README_BLOCKS = page_blocks(README)


def _readme_commands(lang: str) -> list[str]:
    cmds = []
    for b in README_BLOCKS:
        if b.lang == lang:
            for line in b.code.splitlines():
                cmd = line.split("#")[0].strip()
                if cmd:
                    cmds.append(cmd)
    return cmds


def test_readme_opens_with_make_demo_and_make_test() -> None:
    first = next(b.code for b in README_BLOCKS if b.lang == "bash")
    assert "make demo" in first and "make test" in first


def test_make_demo_runs_an_existing_recipe() -> None:
    out = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    m = re.search(r"diffalign fit --config (\S+)", out)
    assert m and (REPO / m.group(1)).is_file(), out


@pytest.mark.slow
def test_readme_quick_start_commands_run(cleandir: Path, capsys) -> None:
    from diffalign.core.cli import cli_main

    cmds = [c for c in _readme_commands("bash") if c.startswith("diffalign")]
    assert len(cmds) >= 6
    runs = cleandir / "runs"
    for cmd in cmds:
        args = shlex.split(cmd)[1:]
        args = [str(REPO / a) if a.startswith("recipes/") else a for a in args]
        if args[0] == "recipes":
            assert cli_main(args) == 0
            assert "ddpo_mode.yaml" in capsys.readouterr().out
            continue
        if args[0] in ("sample", "feedback"):
            extra = ["--seeds_per_prompt", "2"] + (["--progress", "false"] if args[0] == "sample" else [])
            assert cli_main([*args, "--output", str(cleandir / args[0]), *extra]) == 0
            continue
        if args[0] == "reproduce":  # without --full: prints the sidecar of the shipped base
            assert cli_main(args) == 0
            assert '"sha256"' in capsys.readouterr().out
            continue
        if args[0] == "score":
            (cleandir / args[1]).write_text("CCO\nc1ccccc1\nnot-a-smiles\n")
            outputs = [str(cleandir / a) if a.endswith(".csv") else a for a in args[2:]]
            assert cli_main([*args[:2], *outputs]) == 0
            rows = (cleandir / "scores.csv").read_text().splitlines()
            assert len(rows) == 4 and "error" in rows[0]
            continue
        if "--ckpt_path" in args:  # resume the run made by the first fit command
            i = args.index("--ckpt_path")
            args[i + 1] = str(runs / "ddpo_mode" / "version_0" / "checkpoints" / "last.ckpt")
        tiny = [  # the commands must run, not converge
            "--trainer.max_epochs=3",
            "--data.init_args.batches_per_epoch=1",
            "--data.init_args.eval_seeds_per_prompt=4",
        ]
        cli = cli_main([*args, "--run_root", str(runs), *QUIET, *tiny])
        assert (Path(cli.trainer.log_dir) / "summary.json").is_file(), cmd


# ---------------------------------------------------------------------------------------------------
# add_a_modality.md: the example package trains from its recipe and prints what the page shows
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_add_a_modality_recipe_gives_the_documented_result(docs_folder: Path) -> None:
    from diffalign.core.cli import cli_main

    page = "docs/add_a_modality.md"
    written = _write_files(page, docs_folder)
    recipe = next(p for p in written if p.suffix == ".yaml")
    text = (REPO / page).read_text()
    number = r"(-?[\d.]+)"
    result = (
        rf"reward \((\w+)\) before {number} -> after {number} over (\d+) fixed samples; (\d+) reward queries"
    )
    shown = re.search(result, text)
    assert shown, "the page shows no result line"
    cli = cli_main(["fit", "--config", str(recipe), *QUIET])
    import json

    s = json.loads((Path(cli.trainer.log_dir) / "summary.json").read_text())
    assert s["reward_name"] == shown.group(1)
    assert f"{s['reward_before']:.4f}" == shown.group(2)
    assert f"{s['reward_after']:.4f}" == shown.group(3)
    assert s["eval_samples"] == int(shown.group(4)) and s["reward_queries"] == int(shown.group(5))
    assert Path(cli.trainer.log_dir).parent.name == recipe.stem
