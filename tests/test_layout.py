"""The layout of the three scripts: three parts with a banner each and a true map of them in
the module docstring, the algorithm first, CQL-SAC and Cal-QL sharing their common code
byte for byte, the run plumbing identical in all three, imports that follow need.

Allow-lists below name each shared definition that must differ, with its reason."""

import ast
import difflib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("cql_sac_continuous.py", "cql_qrdqn_atari.py", "calql_finetune.py")
PARTS = ("I", "II", "III")
BANNER = {"I": "# Part I: the algorithm", "II": "# Part II: datasets and presets",
          "III": "# Part III: run plumbing (not part of the algorithm)"}
RULE = "# " + "=" * 86
PART_I_MAX = {"cql_sac_continuous.py": 600, "cql_qrdqn_atari.py": 600, "calql_finetune.py": 750}
FIRST_NETWORK_MAX = 200
DIFF_MAX = 700  # changed lines in `diff cql_sac_continuous.py calql_finetune.py`

# Top-level definitions both CQL-SAC and Cal-QL have that differ, each with its reason.
# Everything else both files define is the same text.
MAY_DIFFER = {
    "__doc__": "each script's own paper, usage and map",
    "Args": "each script's own hyperparameters (Cal-QL: the online phase, MC returns)",
    "PRESETS": "each paper's presets, with their sources",
    "ENVS": "each paper's tasks: --env -> (dataset id, preset groups)",
    "FALLBACK": "each script's preset for a dataset without one (by family / generic)",
    "ALONE_TAKES_ITS_PRESET": "Cal-QL: --dataset-id alone runs the preset naming it",
    "ENV_HINT": "Cal-QL: why a <task>-binary has no preset",
    "RULES": "each script's own fields to check",
    "Trainer": "Cal-QL: the phase switch (start_online) and the online CQL weight",
    "sac_update": "Cal-QL: the phase's CQL weight, a tensor (start_online fills it)",
    "compute_losses": "Cal-QL: the calibrated logsumexp, its CQL weight argument",
    "cql_term": "Cal-QL: the calibration max(Q, V_mu) of the policy-action Q-values",
    "reward_scale_bias": "CQL-SAC: --reward-mode (none, locomotion, scale_bias)",
    "env_step": "Cal-QL: the binary reward and the episode end at success",
    "load_data": "Cal-QL: MC returns and the binary relabelling",
    "main": "Cal-QL: pre-training, then the online loop",
    "final_summary": "Cal-QL: offline score, regret, calibration",
    "LENGTH_FIELD": "the run length's field: total_steps / online_steps",
    "planned_updates": "Cal-QL: offline updates plus online env steps x UTD",
}


def source(name: str) -> str:
    return (ROOT / name).read_text()


def parts(name: str) -> dict[str, tuple[int, int]]:
    """Part -> (first line, last line), 1-based, from the banners in the file."""
    lines = source(name).splitlines()
    starts = {}
    for i, line in enumerate(lines):
        for part, title in BANNER.items():
            if line == title:
                assert lines[i - 1] == RULE and lines[i + 1] == RULE, f"{name}: {title} banner"
                assert part not in starts, f"{name}: two {title} banners"
                starts[part] = i  # 1-based line of the rule above the title
    assert sorted(starts) == sorted(PARTS), f"{name}: banners found {sorted(starts)}"
    ordered = [starts[p] for p in PARTS]
    assert ordered == sorted(ordered), f"{name}: parts out of order"
    ends = [*(s - 1 for s in ordered[1:]), len(lines)]
    return {p: (s, e) for p, s, e in zip(PARTS, ordered, ends, strict=True)}


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_docstring_maps_the_three_parts_truly(name):
    doc = ast.get_docstring(ast.parse(source(name)))
    found = {m.group(1): (int(m.group(2)), int(m.group(3)))
             for m in re.finditer(r"Part (III|II|I)\b.*?lines (\d+)-(\d+)", doc)}
    assert found == parts(name)


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_algorithm_comes_first_and_is_short(name):
    lines = source(name).splitlines()
    first_net = next(i for i, line in enumerate(lines, 1)
                     if re.match(r"class \w+\((nn\.Module|torch\.nn\.Module)\)", line))
    assert first_net <= FIRST_NETWORK_MAX
    start, end = parts(name)["I"]
    assert start < first_net <= end
    assert end - start + 1 <= PART_I_MAX[name]
    tree = ast.parse(source(name))
    defs = {n.name: n.lineno for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    for algorithm in ("Args", "Agent", "compute_losses", "Trainer", "ReplayBuffer", "evaluate",
                      "main"):
        assert start <= defs[algorithm] <= end, f"{name}: {algorithm} outside Part I"
    for later in ("preset_args", "presets_markdown", "parse_args", "load_data"):
        assert parts(name)["II"][0] <= defs[later] <= parts(name)["II"][1], later


def part_text(name: str, part: str) -> str:
    start, end = parts(name)[part]
    return "\n".join(source(name).splitlines()[start - 1:end])


def test_the_run_plumbing_is_byte_identical_in_the_three_scripts():
    first, *others = (part_text(name, "III") for name in SCRIPTS)
    for name, text in zip(SCRIPTS[1:], others, strict=True):
        assert text == first, f"{name}'s Part III differs from {SCRIPTS[0]}'s"


def top_level(name: str) -> dict[str, str]:
    """Name -> source text of each top-level function, class and assignment."""
    text = source(name)
    tree = ast.parse(text)
    out = {"__doc__": ast.get_docstring(tree)}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        segment = "\n".join(text.splitlines()[start - 1:node.end_lineno])
        out.update({n: segment for n in names})
    return out


def test_cql_sac_and_calql_share_their_common_definitions_byte_for_byte():
    sac, calql = top_level("cql_sac_continuous.py"), top_level("calql_finetune.py")
    common = sorted(set(sac) & set(calql))
    assert len(common) >= 30, common  # networks, losses, data, presets, plumbing
    drifted = [n for n in common if sac[n] != calql[n] and n not in MAY_DIFFER]
    assert not drifted, f"shared definitions that differ: {drifted}"
    stale = [n for n in MAY_DIFFER if n in common and sac[n] == calql[n]]
    assert not stale, f"allow-listed but identical (drop from MAY_DIFFER): {stale}"


def changed_lines(a: str, b: str) -> int:
    matcher = difflib.SequenceMatcher(None, a.splitlines(), b.splitlines(), autojunk=False)
    return sum(max(i2 - i1, 0) + max(j2 - j1, 0)
               for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal")


DIFF_NOW = 922  # 2026-12-07: 1102 (issue 16: shared evaluate, data loading), +3 for Cal-QL's
# answer to a D4RL Adroit level (issue 22, binary_hint), -74 for one AntMaze block (issue 16),
# +12 for D4RL kitchen's demo-end terminals; 2026-12-08: -138 for one family section in both
# (Cal-QL's eval env, reference scores and family named from the shared blocks, its success
# score one wrapper over them), -4 for two help texts (--run-dir, --lagrange) that said the
# same in other words, +21 for CQL-SAC's `antmaze-cql-code` preset group (the CQL code's own
# antmaze run, next to the Cal-QL/CORL recipe); may shrink, not grow


# Where the 922 lines are (2026-12-08, changed_lines by part): module docstring 25; Part I 305
# (Cal-QL's Args, calibration, online buffer, trajectory collection and loop); Part II 592:
# presets about 320 (each paper's values and sources), loading about 150 (Cal-QL's MC returns,
# success infos, dropped failures, --horizon), families about 60 (Cal-QL's binary relabelling
# and env_step, its success score), the run's summary and counters about 45; Part III 0.
@pytest.mark.xfail(strict=True, reason="issue 16 open: the diff is 922 changed lines, not <= "
                   "700 (each paper's presets, Cal-QL's online phase and MC returns)")
def test_the_calql_diff_shows_only_what_calql_changes():
    assert changed_lines(source("cql_sac_continuous.py"), source("calql_finetune.py")) <= DIFF_MAX


def test_the_calql_diff_does_not_grow():
    assert changed_lines(source("cql_sac_continuous.py"), source("calql_finetune.py")) <= DIFF_NOW


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_family_branch_in_evaluate(name):
    text = top_level(name)["evaluate"]
    for family in ("antmaze", "kitchen", "adroit", "pointmaze", "dqn_replay"):
        assert family not in text.lower(), f"{name}: evaluate names {family}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_presets_have_one_shape(name):
    module = __import__(name.removesuffix(".py"))
    assert callable(module.preset_args) and callable(module.presets_markdown)
    for group, fields in module.PRESETS.items():
        for field, entry in fields.items():
            value, src = entry
            assert isinstance(src, str) and src.strip(), f"{name}: {group}.{field} unsourced"
            assert hasattr(module.Args, field) or field in module.Args.__dataclass_fields__
    assert module.ENV_GROUPS
    for env, groups in module.ENV_GROUPS.items():
        assert all(g in module.PRESETS for g in groups), f"{name}: {env} -> {groups}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_docs_preset_tables_are_what_presets_prints(name):
    """docs/presets_<script>.md (linked from docs/usage.md) is `python <script> --presets`."""
    module = __import__(name.removesuffix(".py"))
    doc = ROOT / "docs" / f"presets_{name.removesuffix('.py')}.md"
    assert doc.read_text().rstrip("\n") == module.presets_markdown().rstrip("\n"), (
        f"regenerate: python {name} --presets > {doc.relative_to(ROOT)}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_texts_are_sentences(name):
    tree = ast.parse(source(name))
    args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    body = args.body
    for field, doc in zip(body, body[1:], strict=False):
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(
                doc.value, ast.Constant):
            text = doc.value.value.strip()
            assert text[0].isupper() or text[0] in "`-(\"'", f"{field.target.id}: {text!r}"
            assert text.endswith((".", ")", "`")), f"{field.target.id}: {text!r}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_runs_of_blank_lines(name):
    assert "\n\n\n\n" not in source(name), f"{name}: three or more blank lines in a row"


OPTIONAL = ("ale_py", "cv2", "gymnasium_robotics", "minari", "wandb", "matplotlib", "h5py")


@pytest.mark.parametrize("name", SCRIPTS)
def test_imports_follow_need(name):
    """The script imports and prints its help with none of the optional packages."""
    block = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, fullname, path, target=None):\n"
        f"        if fullname.split('.')[0] in {OPTIONAL!r}:\n"
        "            raise ImportError('blocked: ' + fullname)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"import {name.removesuffix('.py')} as m\n")
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_test_files_are_named_by_script():
    prefixes = ("test_cql_sac_", "test_cql_qrdqn_", "test_calql_", "test_benchmark_")
    shared = {"test_run_contract.py", "test_layout.py", "test_readme.py", "test_twins.py",
              "test_envs.py", "test_compile.py", "test_license_citation.py",
              "test_after_training.py"}
    for path in (ROOT / "tests").glob("test_*.py"):
        assert path.name in shared or path.name.startswith(prefixes), path.name


def rewrite_maps() -> None:
    """`python tests/test_layout.py`: write the true line ranges into each docstring's map
    (the docstring keeps its number of lines, so one pass suffices)."""
    for name in SCRIPTS:
        try:
            ranges = parts(name)
        except AssertionError:  # no banners yet
            continue
        text = re.sub(r"(Part (III|II|I)\b.*?lines )(\d+)-(\d+)",
                      lambda m, r=ranges: f"{m.group(1)}{r[m.group(2)][0]}-{r[m.group(2)][1]}",
                      source(name))
        (ROOT / name).write_text(text)



def without_family_blocks(text: str) -> str:
    """The script with each family block cut out: from a `# ---- family: ...` (QR-DQN:
    `# --- Family: ...`) header to the next section header."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if re.match(r"# ---+ [Ff]amily: ", line):
            skipping = True
        elif skipping and re.match(r"# (---|===)", line):
            skipping = False
        if not skipping:
            out.append(line)
    return "".join(out)


GENERIC_RUNS = {  # script key -> (env of the hand-made dataset, its few steps)
    "cql_sac": ("Pendulum-v1", {"total_steps": "2", "eval_every": "2"}),
    "calql": ("Pendulum-v1", {"offline_steps": "2", "offline_eval_every": "2",
                              "online_steps": "2", "eval_every": "2"}),
    "qrdqn": ("CartPole-v1", {"total_steps": "2", "eval_every": "2"}),
}


@pytest.mark.parametrize("key", list(GENERIC_RUNS))
def test_a_copy_without_the_family_blocks_runs_on_ones_own_data(tmp_path, key):
    """What each docstring tells someone copying the file: delete the family blocks and
    the generic path still runs on a Minari dataset of one's own (`--dataset-id`, no
    `--env`), and the copy imports neither ALE nor OpenCV (gymnasium-robotics stays a lazy
    import, for an env id gymnasium does not know)."""
    from conftest import SCRIPTS, read_json, run_script, write_dataset

    script = SCRIPTS[key]
    text = without_family_blocks(source(script.file))
    assert len(text) < len(source(script.file)), f"{script.file}: no family block found"
    for module in ("ale_py", "cv2"):
        assert f"import {module}" not in text, f"{script.file} copy imports {module}"
    copy = tmp_path / script.file
    copy.write_text(text)
    env_id, steps = GENERIC_RUNS[key]
    write_dataset(tmp_path / "data", "someone/own/tiny-v0", env_id)
    argv = script.args(tmp_path / "run", **steps)
    argv[argv.index("--env"):argv.index("--env") + 2] = ["--dataset-id", "someone/own/tiny-v0"]
    done = run_script(str(copy), *argv, env={"MINARI_DATASETS_PATH": str(tmp_path / "data")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_json(tmp_path / "run" / "summary.json")["final_return"] is not None


if __name__ == "__main__":
    rewrite_maps()
