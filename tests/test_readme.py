"""The README's code runs as written: its Python blocks in order (later blocks use earlier names), and every
command, config file and module its shell blocks name exists (the commands themselves are exercised by the
script tests; here they must not rot)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from course_transformer.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "path/to/" not in b]
SHELL_LINES = [
    line.split("#")[0].strip()
    for block in re.findall(r"```bash\n(.*?)```", README, re.S)
    for line in block.replace("\\\n", " ").splitlines()
    if line.split("#")[0].strip()
]


def test_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    namespace: dict = {}
    assert len(PYTHON_BLOCKS) >= 4
    for index, block in enumerate(PYTHON_BLOCKS):
        exec(compile(block, f"README python block {index}", "exec"), namespace)
    # The claims the blocks print, asserted: our attention under sdpa equals BERT's, and the heatmap exists.
    assert max((a - b).abs().max().item() for a, b in zip(namespace["ours"], namespace["theirs"])) <= 1e-5
    assert os.path.getsize(Path(namespace["folder"]) / "heatmap.png") > 10_000
    assert "<script" in namespace["html"].data
    # The lens block: transformers' own BertModel under "lens" returns eager's weights (1e-5, fp32), and ablating
    # two heads changes the output.
    eager = namespace["bert"]  # loaded with eager attention by the earlier block
    with torch.no_grad():
        reference = eager(**namespace["batch"], output_attentions=True)
    worst = max((a - b).abs().max().item() for a, b in zip(namespace["lens_weights"], reference.attentions))
    assert len(namespace["lens_weights"]) == 6 and worst <= 1e-5
    assert (namespace["ablated"] - reference.last_hidden_state).abs().max() > 1e-3
    # GPT-2 -> ours -> GPT-2: same logits (1e-5, fp32), bit-identical weights after the round trip.
    ids, gpt2, back = namespace["ids"], namespace["gpt2"], namespace["back"]
    assert (namespace["course"](ids).logits - gpt2(ids).logits).abs().max().item() <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(gpt2.state_dict().values(), back.state_dict().values()))
    # The fast decoding block: the packed model's greedy tokens are GPT-2's.
    expected = gpt2.generate(ids[:1, :4], max_new_tokens=8, do_sample=False)
    assert torch.equal(namespace["tokens"], expected) and not namespace["fast"].fast_decoding_enabled


def test_shell_blocks_name_real_commands_files_and_modules():
    assert SHELL_LINES
    for line in SHELL_LINES:
        words = shlex.split(line)
        words = [w for w in words if "=" not in w or w.startswith("-")]  # drop VAR=value prefixes
        if words[0] == "course-transformer":
            assert words[1] in COMMANDS, line
        if words[0] == "make":
            assert re.search(rf"^{words[1]}:", (ROOT / "Makefile").read_text(), re.M), line
        for i, word in enumerate(words):
            if word == "-m":
                module = words[i + 1]
                assert importlib.util.find_spec(module) is not None, f"{line}: no module {module}"
            if word.startswith("configs/"):
                assert (ROOT / word).is_file(), f"{line}: no file {word}"


@pytest.mark.parametrize("link", sorted(set(re.findall(r"\]\(((?:docs|configs)/[^)#]+)\)", README))))
def test_linked_files_exist(link):
    assert (ROOT / link).exists(), link
