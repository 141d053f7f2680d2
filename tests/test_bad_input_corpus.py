"""A corpus of broken recipes and datasets (tests/corpus/), each with the exact lines a user
sees (tests/corpus/expected.json): exit code 2, `error:` lines naming the file, key or row, the
value and the fix, never a traceback. UPDATE_CORPUS=1 rewrites the expected file; review the diff."""

import contextlib
import io
import json
import os

import pytest

from launcher.cli import main
from tests.conftest import REPO, RECIPES

CORPUS = REPO / "tests" / "corpus"
EXPECTED = CORPUS / "expected.json"


def cases():
    for path in sorted((CORPUS / "recipes").iterdir()):
        head = path.read_bytes()[:200].decode(errors="replace")
        cluster = head.split("# cluster: ", 1)[1].split()[0] if head.startswith("# cluster: ") else "local"
        yield f"recipes/{path.name}", ["validate", str(path.relative_to(REPO)), "--cluster", cluster]
    for path in sorted((CORPUS / "data").iterdir()):
        extra = ["data.multiturn.enable=true"] if path.suffix == ".jsonl" else []
        yield f"data/{path.name}", ["data", "check", str((RECIPES / "tiny_moe.yaml").relative_to(REPO)),
                                    f"data.train_files=[{path}]", *extra]


def run(argv) -> tuple[int, str]:
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
            code = main(argv)
    finally:
        os.chdir(cwd)
    shown = err.getvalue() + "".join(line + "\n" for line in out.getvalue().splitlines()
                                     if line.startswith(("bad row", "            the job")))
    return code, shown.replace(str(REPO), "$REPO")


def test_every_corpus_entry_has_its_expected_message():
    found = {name: dict(zip(("exit_code", "output"), run(argv))) for name, argv in cases()}
    if os.environ.get("UPDATE_CORPUS"):
        EXPECTED.write_text(json.dumps(found, indent=1, ensure_ascii=False) + "\n")
    expected = json.loads(EXPECTED.read_text())
    assert sorted(found) == sorted(expected), "a corpus file without an expected message, or the reverse"
    for name, result in found.items():
        assert result == expected[name], name
        assert result["exit_code"] == 2, name
        assert "Traceback" not in result["output"] and result["output"].strip(), name


@pytest.mark.parametrize("name", ["recipes/unknown_key.yaml", "data/prompt_is_a_number.parquet"])
def test_messages_name_the_place_and_the_fix(name):
    result = json.loads(EXPECTED.read_text())[name]
    if name.startswith("recipes/"):  # the file, its line and key, and the closest valid key
        assert result["output"] == ("error: tests/corpus/recipes/unknown_key.yaml:6: megatron.tensor_parallel_size: "
                                    "unknown key (did you mean 'tensor_model_parallel_size'?)\n")
    else:  # the file and row, the column and what it must be
        assert "prompt_is_a_number.parquet: row 0: 'prompt' must be a string, found int" in result["output"]
