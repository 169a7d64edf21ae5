"""Publishing: the repository folder, its model card, the fresh-process validation and the upload call sequence.

No test talks to the Hub: uploads go to a recording stand-in for `huggingface_hub.HfApi`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import build_tokenizer, tiny_config, tiny_model
from huggingface_hub import ModelCard
from safetensors import safe_open

from course_transformer.commands import publish
from course_transformer.commands.publish import PublishError, build_model_card, build_repo_folder, read_results, upload


class RecordingApi:
    """Stands in for `HfApi`: records each call (and the folder's files at upload time), uploads nothing."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(url=f"https://hub.invalid/{repo_id}")

    def upload_folder(self, **kwargs):
        files = sorted(os.listdir(kwargs["folder_path"]))
        self.calls.append(("upload_folder", kwargs, files))
        return SimpleNamespace(commit_url=f"https://hub.invalid/{kwargs['repo_id']}/commit/0123abc")

    def __getattr__(self, name):
        raise AssertionError(f"unexpected HfApi call: {name}")


def save_source(folder: Path, arch: str, **overrides) -> Path:
    tiny_model(arch, **overrides).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def test_dry_run_builds_a_folder_that_loads_without_the_package(tmp_path, capsys):
    source = save_source(tmp_path / "decoder", "decoder", position_encoding="rope")
    source_files = {p.name: p.stat().st_mtime_ns for p in source.iterdir()}
    results = tmp_path / "report.json"
    results.write_text(json.dumps({"metrics": {"perplexity": 41.25, "accuracy": 0.31}, "dataset": "bible-kjv"}))
    output = tmp_path / "repo"
    api = RecordingApi()
    argv = [str(source), "--repo-id", "someone/tiny-decoder", "--output", str(output), "--dry-run"]
    argv += ["--results", str(results), "--dataset", "bible-kjv", "--tag", "course"]
    assert publish.main(argv, api=api) == 0
    out = capsys.readouterr().out

    assert api.calls == []  # a dry run never reaches the Hub
    assert "dry run: nothing uploaded to someone/tiny-decoder" in out
    assert "CourseTransformerForCausalLM loaded from the folder's code (transformers_modules.*)" in out
    assert "the card's usage snippet ran" in out
    sizes = {p.name: p.stat().st_size for p in output.iterdir()}
    for name in ("model.safetensors", "config.json", "generation_config.json", "README.md", "tokenizer.json"):
        assert f"{sizes[name]:>12,d}  {name}" in out, name
    assert set(publish.CODE_FILES) <= set(sizes)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert {p.name: p.stat().st_mtime_ns for p in source.iterdir()} == source_files  # the source is untouched

    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_course_transformer.CourseTransformerForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_course_transformer.CourseTransformerConfig"
    with safe_open(output / "model.safetensors", "pt") as f, safe_open(source / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())

    card = ModelCard.load(output / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"course-transformer", "custom_code", "decoder", "rope-positions", "course"} <= set(card.data.tags)
    assert card.data.datasets == ["bible-kjv"]
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {"perplexity": 41.25, "accuracy": 0.31}
    assert 'pipeline("text-generation", model="someone/tiny-decoder", trust_remote_code=True)' in card.text
    assert "| bible-kjv |  | perplexity | 41.25 |" in card.text


def test_upload_calls_create_repo_then_upload_folder_with_the_validated_folder(tmp_path, capsys):
    """An encoder-decoder folder saved without its code or auto_map: the build adds both, the custom
    text2text-generation pipeline runs in the fresh process, then the Hub calls come in order."""
    source = save_source(tmp_path / "seq2seq", "encoder-decoder", position_encoding="sinusoidal")
    for name in publish.CODE_FILES:
        (source / name).unlink()
    config = json.loads((source / "config.json").read_text())
    del config["auto_map"], config["custom_pipelines"]
    (source / "config.json").write_text(json.dumps(config))
    output = tmp_path / "repo"
    api = RecordingApi()
    argv = [str(source), "--repo-id", "someone/tiny-seq2seq", "--output", str(output), "--private"]
    argv += ["--license", "mit", "--sample-text", "le chat est sur tapis"]
    assert publish.main(argv, api=api) == 0
    out = capsys.readouterr().out

    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    _, repo_id, create_kwargs = api.calls[0]
    assert repo_id == "someone/tiny-seq2seq"
    assert create_kwargs == {"repo_type": "model", "private": True, "exist_ok": True}
    _, upload_kwargs, uploaded = api.calls[1]
    assert upload_kwargs["repo_id"] == "someone/tiny-seq2seq" and upload_kwargs["repo_type"] == "model"
    assert Path(upload_kwargs["folder_path"]) == output
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json", *publish.CODE_FILES} <= set(uploaded)
    assert "https://hub.invalid/someone/tiny-seq2seq/commit/0123abc" in out  # the URL the (stand-in) Hub gave

    built = json.loads((output / "config.json").read_text())
    assert built["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_course_transformer.CourseTransformerForSeq2SeqLM"
    assert "text2text-generation" in built["custom_pipelines"]
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "text2text-generation" and card.data.license == "mit"
    assert "pipeline('text2text-generation')('le chat est sur tapis')" in out


def test_folder_that_fails_in_a_fresh_process_is_not_published(tmp_path, capsys):
    """Code that only works because the package is installed here (an absolute import of `modeling`) must fail
    validation; nothing is built or uploaded. (The config code is broken: it fails before torch is imported.)"""
    source = save_source(tmp_path / "decoder", "decoder")
    code = source / "configuration_course_transformer.py"
    code.write_text("from modeling.presets import load_preset  # absolute import of the package\n" + code.read_text())
    output = tmp_path / "repo"
    api = RecordingApi()
    capsys.readouterr()  # drop save_pretrained's progress bar
    status = publish.main([str(source), "--repo-id", "someone/broken", "--output", str(output)], api=api)
    err = capsys.readouterr().err
    assert status == 1 and api.calls == []
    assert "validation failed" in err and "fresh process" in err and "blocked: modeling" in err
    assert len(err.strip().splitlines()) == 1
    assert not output.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]


@pytest.mark.parametrize(
    "arch,head,tag",
    [
        ("decoder", "CourseTransformerForCausalLM", "text-generation"),
        ("encoder", "CourseTransformerForMaskedLM", "fill-mask"),
        ("encoder-decoder", "CourseTransformerForSeq2SeqLM", "text2text-generation"),
        ("encoder", "CourseTransformerForSequenceClassification", "text-classification"),
    ],
)
def test_pipeline_tag_follows_the_head(arch, head, tag):
    card = build_model_card(tiny_config(arch), head, 1234, "a/b", "apache-2.0", [], [], [])
    again = ModelCard(str(card))  # what the Hub parses back
    assert again.data.pipeline_tag == tag and again.data.library_name == "transformers"
    assert f'pipeline("{tag}", model="a/b", trust_remote_code=True)' in again.text
    assert again.data.eval_results is None and "## Evaluation" not in again.text


def test_results_report_shapes(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"results": [{"metric": "bleu", "value": 12.5, "dataset": "kjv-fr", "split": "test"}]}))
    assert read_results(path) == [{"metric": "bleu", "value": 12.5, "dataset": "kjv-fr", "split": "test"}]
    path.write_text(json.dumps({"metrics": {"ppl": 3}, "dataset": {"name": "kjv", "split": "validation"}}))
    assert read_results(path) == [
        {"metric": "ppl", "value": 3, "dataset": "kjv", "split": "validation", "config": None}
    ]
    path.write_text(json.dumps({"ppl": 3.5, "model": "tiny", "ok": True}))  # flat: numbers only, booleans skipped
    assert read_results(path, default_dataset="mine") == [{"metric": "ppl", "value": 3.5, "dataset": "mine"}]
    log = tmp_path / "metrics.jsonl"  # course_transformer/commands/train.py's log: the last evaluation counts
    entries = [
        {"kind": "train", "step": 10, "loss": 5.0},
        {"kind": "eval", "step": 10, "eval_loss": 4.0, "perplexity": 54.6, "eval_tokens": 900, "samples": ["a"]},
        {"kind": "eval", "step": 20, "eval_loss": 3.0, "perplexity": 20.1, "eval_tokens": 900, "samples": ["b"]},
    ]
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    rows = read_results(log, default_dataset="kjv")
    assert [(r["metric"], r["value"]) for r in rows] == [("eval_loss", 3.0), ("perplexity", 20.1)]
    log.write_text(json.dumps(entries[0]) + "\n")
    with pytest.raises(PublishError, match="no evaluation entry"):
        read_results(log)


def test_upload_refuses_offline_or_without_a_token(tmp_path, monkeypatch):
    import huggingface_hub

    class NoApi:
        def __init__(self, *args, **kwargs):
            raise AssertionError("HfApi must not be constructed")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set"):
        upload(tmp_path, "someone/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PublishError, match="no Hugging Face token: set HF_TOKEN"):
        upload(tmp_path, "someone/model")


def test_rebuild_with_overwrite_replaces_the_folder(tmp_path):
    source = save_source(tmp_path / "encoder", "encoder")
    output = tmp_path / "repo"
    output.mkdir()
    (output / "stale.txt").write_text("from an earlier build")
    result = build_repo_folder(source, output, "someone/enc", overwrite=True, validate=False)
    assert "stale.txt" not in result.files and "model.safetensors" in result.files
    assert result.pipeline_tag == "fill-mask"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]
    shutil.rmtree(output)


def test_the_training_runs_card_becomes_the_training_section(tmp_path):
    """course_transformer/commands/train.py writes a README.md into its final folder: its notes and tags are kept, its
    title and
    usage section are replaced by the published card's."""
    source = save_source(tmp_path / "final", "decoder")
    (source / "README.md").write_text(
        "---\ntags: [course-transformer, causal_lm]\nlicense: apache-2.0\n---\n\n# run: a course Transformer\n\n"
        "Trained on `bible-kjv` for 300 steps.\n\n## Validation (held-out books)\n\n| perplexity | 20.1 |\n\n"
        "```python\n# a comment, not a heading\n```\n\n## Use\n\n```python\nAutoModel.from_pretrained(...)\n```\n"
    )
    build_repo_folder(source, tmp_path / "repo", "someone/run", validate=False)
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert "causal_lm" in card.data.tags and card.data.pipeline_tag == "text-generation"
    assert "## Training\n\nTrained on `bible-kjv` for 300 steps." in card.text
    assert "### Validation (held-out books)" in card.text and "# a comment, not a heading" in card.text
    assert "# run: a course Transformer" not in card.text and "AutoModel.from_pretrained(...)" not in card.text


def test_sharded_checkpoint_is_checked_and_copied_whole(tmp_path):
    source = tmp_path / "sharded"
    tiny_model("decoder").save_pretrained(source, max_shard_size="30KB")
    build_tokenizer().save_pretrained(source)
    shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    assert len(shards) > 1
    result = build_repo_folder(source, tmp_path / "repo", "someone/sharded", validate=False)
    assert set(shards) | {"model.safetensors.index.json"} <= set(result.files)
    assert "model.safetensors" not in result.files


def test_the_validator_module_blocks_the_whole_project_even_when_run_with_dash_m(tmp_path):
    """`python -m course_transformer.commands.validate` imports the package to start: it re-runs itself by path in
    an isolated interpreter, where an import of any project package by the folder's code is refused."""
    import subprocess
    import sys

    from course_transformer.commands.validate import BLOCKED, isolated_command

    assert set(BLOCKED) == {"modeling", "evaluation", "scripts", "course_transformer"}
    assert isolated_command(["x"])[1:3] == ["-I", str(Path(publish.__file__).with_name("validate.py"))]
    source = save_source(tmp_path / "decoder", "decoder")
    build_repo_folder(source, tmp_path / "repo", "someone/decoder", validate=False)
    code = tmp_path / "repo" / "configuration_course_transformer.py"
    code.write_text("import course_transformer.core.io  # the tools are not on the Hub\n" + code.read_text())
    command = [sys.executable, "-m", "course_transformer.commands.validate", str(tmp_path / "repo")]
    command += ["--task", "text-generation", "--auto-class", "AutoModelForCausalLM"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == "ImportError: blocked: course_transformer"
