"""Bad inputs, table-driven: each gets a clear error naming what is wrong, and nothing is left half-written.

Covers JSON config files, model inputs not covered by test_heads_and_errors.py, checkpoint files (truncated,
wrong shapes, missing and unexpected keys, pickles that must never be unpickled), command-line arguments and the
data files that publishing reads (harness results, tokenizer, generation config).
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, tiny_model
from safetensors.torch import load_file, save_file

import modeling
from course_transformer import cli
from course_transformer.commands.publish import PublishError, build_repo_folder
from course_transformer.core.checkpoint import CheckpointError, load_checkpoint_state, validate_checkpoint_folder

# ---------------------------------------------------------------------------------------------------------------
# Fixtures: one saved decoder folder (weights + tokenizer), copied and broken per case
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "decoder"
    tiny_model("decoder").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def broken(saved, tmp_path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(saved, folder)
    return folder


def assert_nothing_written(parent: Path, output: Path) -> None:
    assert not output.exists(), f"{output} was left behind"
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"


# ---------------------------------------------------------------------------------------------------------------
# 1. JSON config files (preset files and a saved folder's config.json)
# ---------------------------------------------------------------------------------------------------------------

TINY = {"architecture": "decoder", "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4}
BAD_PRESET_FILES = [
    ({"hidden_size": "32"}, "hidden_size='32'"),  # a string where an integer belongs
    ({"vocab_size": None}, "vocab_size=None"),
    ({"num_attention_heads": True}, "num_attention_heads=True"),  # JSON true is not a count
    ({"layer_norm_eps": "1e-5"}, "layer_norm_eps='1e-5'"),
    ({"rope_theta": -1.0}, "rope_theta=-1.0"),
    ({"attention_dropout_prob": 1.0}, "attention_dropout_prob=1.0"),
    ({"max_position_embeddings": 0}, "max_position_embeddings=0"),
]


@pytest.mark.parametrize("fields,needle", BAD_PRESET_FILES)
def test_bad_preset_file_names_field_and_value(tmp_path, fields, needle):
    path = tmp_path / "preset.json"
    path.write_text(json.dumps({**TINY, **fields}))
    with pytest.raises(ValueError) as err:
        modeling.load_preset(str(path))
    assert needle in str(err.value) and "CourseTransformerConfig." in str(err.value)


def test_missing_preset_file_lists_available_presets(tmp_path):
    with pytest.raises(ValueError, match="not found; available presets: .*tiny-decoder"):
        modeling.load_preset(str(tmp_path / "nope.json"))


def test_preset_file_with_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"architecture": "decoder",}')
    with pytest.raises(ValueError, match="broken.json"):
        modeling.load_preset(str(path))


def test_preset_file_with_misspelt_field_is_refused(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({**TINY, "hidden_sise": 64}))
    with pytest.raises(ValueError, match="hidden_sise"):
        modeling.load_preset(str(path))


def _set_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


BAD_CONFIG_JSON = [
    ("invalid JSON", lambda f: (f / "config.json").write_text('{"model_type": "course_transformer",'), "invalid JSON"),
    ("not an object", lambda f: (f / "config.json").write_text("[1, 2]"), "expected a JSON object"),
    ("missing", lambda f: (f / "config.json").unlink(), "config.json: missing"),
    ("other model type", lambda f: _set_config(f, model_type="bert"), "model_type='bert'"),
    ("bad field value", lambda f: _set_config(f, hidden_size=30), "hidden_size=30"),
    ("unknown head class", lambda f: _set_config(f, architectures=["BertModel"]), "'BertModel'"),
]


@pytest.mark.parametrize("name,mutate,needle", BAD_CONFIG_JSON, ids=[c[0] for c in BAD_CONFIG_JSON])
def test_bad_config_json_in_a_saved_folder(broken, tmp_path, name, mutate, needle):
    mutate(broken)
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint_folder(broken)
    assert needle in str(err.value) and "config.json" in str(err.value)
    output = tmp_path / "repo"
    with pytest.raises(CheckpointError):
        build_repo_folder(broken, output, "user/model", validate=False)
    assert_nothing_written(tmp_path, output)


# ---------------------------------------------------------------------------------------------------------------
# 2. Model inputs (new ground; test_heads_and_errors.py covers ids range/dtype/shape, masks, head_mask shape)
# ---------------------------------------------------------------------------------------------------------------

IDS = torch.ones(1, 4, dtype=torch.long)
BAD_MODEL_INPUTS = [
    ("decoder", lambda m: m(IDS, inputs_embeds=torch.zeros(1, 4, 32)), "exactly one of input_ids and inputs_embeds"),
    ("decoder", lambda m: m(torch.ones(1, 2, 3, dtype=torch.long)), "got (1, 2, 3)"),
    (
        "encoder-decoder",
        lambda m: m(IDS, decoder_input_ids=torch.tensor([[1, 200]])),
        "decoder_input_ids contains 200",
    ),
    (
        "encoder-decoder",
        lambda m: m(torch.ones(1, 70, dtype=torch.long), decoder_input_ids=torch.tensor([[1]])),
        "max_position_embeddings=64",
    ),
    ("encoder", lambda m: m(IDS, token_type_ids=torch.full((1, 4), 5)), "token_type_ids contains 5"),
]


@pytest.mark.parametrize("arch,call,needle", BAD_MODEL_INPUTS)
def test_bad_model_input_is_named(arch, call, needle):
    model = tiny_model(arch, type_vocab_size=2 if arch == "encoder" else 0)
    with pytest.raises(ValueError) as err:
        call(model)
    assert needle in str(err.value)


# Found by this suite, then checked by the model: each used to fail deep in torch or pass silently.
MORE_MODEL_INPUTS = [
    (lambda m: m(inputs_embeds=torch.zeros(1, 4, 16)), "hidden_size"),
    (lambda m: m(IDS, labels=torch.ones(1, 5, dtype=torch.long)), "labels"),
    (lambda m: m(IDS, position_ids=torch.tensor([[0, 1, 2, 99]])), "position_ids"),
    (lambda m: m(IDS, output_attentions=True, attention_layers=[5]), "attention_layers"),
    (lambda m: m(IDS, attention_mask=torch.full((1, 4), 2)), "attention_mask contains 2"),
    (lambda m: m(IDS, position_ids=torch.tensor([[0, 1, 2]])), "position_ids must have shape"),
    (lambda m: m(IDS, output_attentions=True, attention_layers=[-3]), "allowed indices are -2 .. 1"),
]


def test_float_labels_are_a_type_error():
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        tiny_model("decoder")(IDS, labels=torch.ones(1, 4))


def test_valid_variants_of_the_checked_inputs_still_work():
    model = tiny_model("decoder")
    out = model(IDS, output_attentions=True, attention_layers=[-1], attention_mask=torch.ones(1, 4, dtype=torch.bool))
    assert len(out.attentions) == 1
    explicit = model(IDS, position_ids=torch.arange(4)[None]).logits
    assert torch.equal(explicit, model(IDS).logits)


@pytest.mark.parametrize("call,needle", MORE_MODEL_INPUTS)
def test_more_model_inputs_are_named(call, needle):
    with pytest.raises(ValueError) as err:
        call(tiny_model("decoder"))
    assert needle in str(err.value)


# Inputs that used to fail vaguely (a reshape error deep in transformers, an AttributeError, an IndexError after the
# whole forward): each is now named, with its value and what is allowed, before the first layer runs.
SEQ_IDS = torch.ones(1, 3, dtype=torch.long)
VAGUE_BEFORE = [
    ("decoder", lambda m: m(torch.ones(1, 0, dtype=torch.long)), ValueError, ["input_ids has shape (1, 0)"]),
    ("decoder", lambda m: m(torch.ones(0, 4, dtype=torch.long)), ValueError, ["input_ids has shape (0, 4)"]),
    ("encoder", lambda m: m(torch.ones(1, 0, dtype=torch.long)), ValueError, ["input_ids has shape (1, 0)"]),
    ("decoder", lambda m: m(IDS, past_key_values=((1, 2),)), TypeError, ["past_key_values must be", "tuple"]),
    ("decoder", lambda m: m([[1, 2, 3]]), TypeError, ["input_ids must be a torch.Tensor", "list"]),
    ("decoder", lambda m: m(IDS, labels=torch.tensor([[1, 2, 64, 3]])), ValueError, ["labels contains 64", "[0, 64)"]),
    ("decoder", lambda m: m(IDS, labels=torch.tensor([[1, -5, 2, 3]])), ValueError, ["labels contains -5", "-100"]),
    ("decoder", lambda m: m(IDS, head_mask=torch.ones(3)), ValueError, ["head_mask has shape (3,)", "(4,) or (2, 4)"]),
    (
        "decoder",
        lambda m: m(IDS, output_attentions=True, attention_layers="all"),
        ValueError,
        ["attention_layers must be a list of layer indices", "'all'"],
    ),
    (
        "encoder-decoder",
        lambda m: m(IDS, decoder_input_ids=SEQ_IDS, cross_attn_head_mask=torch.ones(2, 3)),
        ValueError,
        ["cross_attn_head_mask has shape (2, 3)", "(4,) or (2, 4)"],
    ),
    (
        "encoder-decoder",
        lambda m: m(encoder_outputs=(torch.zeros(1, 4, 16),), decoder_input_ids=SEQ_IDS),
        ValueError,
        ["encoder_outputs[0]", "hidden_size=32", "(1, 4, 16)"],
    ),
    (
        "encoder-decoder",
        lambda m: m(IDS, decoder_input_ids=SEQ_IDS, labels=torch.tensor([[5, 99, 2]])),
        ValueError,
        ["labels contains 99", "[0, 64)"],
    ),
]


@pytest.mark.parametrize("arch,call,error,needles", VAGUE_BEFORE)
def test_formerly_vague_inputs_are_named_before_any_layer_runs(arch, call, error, needles, monkeypatch):
    model = tiny_model(arch, attn_implementation="sdpa")  # sdpa: the empty input used to die inside its wrapper
    for stack in (model.model.encoder, model.model.decoder):
        if stack is not None:
            monkeypatch.setattr(stack.layers[0], "forward", lambda *a, **k: pytest.fail("a layer ran"))
    with pytest.raises(error) as err:
        call(model)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


@pytest.mark.parametrize(
    "head,labels,needle",
    [
        ("sequence", torch.tensor([0, 3]), "labels contains 3, outside [0, 3) allowed by config.num_labels=3"),
        ("token", torch.tensor([[0, 1, 2, 3], [0, 1, -100, 2]]), "labels contains 3, outside -100 (ignored)"),
    ],
)
def test_class_labels_beyond_num_labels_are_named(head, labels, needle, monkeypatch):
    classes = {
        "sequence": modeling.CourseTransformerForSequenceClassification,
        "token": modeling.CourseTransformerForTokenClassification,
    }
    from conftest import tiny_config

    model = classes[head](tiny_config("encoder", num_labels=3)).eval()
    monkeypatch.setattr(model.model.encoder.layers[0], "forward", lambda *a, **k: pytest.fail("a layer ran"))
    with pytest.raises(ValueError) as err:
        model(torch.ones(2, 4, dtype=torch.long), labels=labels)
    assert needle in str(err.value)


def test_decoding_steps_read_nothing_back_but_prefill_still_checks(monkeypatch):
    """Value checks cost one host read on a forward without cached tokens and none on a decoding step."""
    model = tiny_model("decoder")
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or original(self))
    out = model(torch.tensor([[3, 4, 5]]), use_cache=True)
    assert len(reads) == 1  # ids and mask checked together in one read
    model(torch.tensor([[6]]), past_key_values=out.past_key_values, use_cache=True)
    assert len(reads) == 1  # the decoding step read nothing
    with pytest.raises(ValueError, match="input_ids contains 64"):
        model(torch.tensor([[3, 64]]))


# ---------------------------------------------------------------------------------------------------------------
# 3. Checkpoint files
# ---------------------------------------------------------------------------------------------------------------

Q_KEY = "model.decoder.layers.0.self_attn.q_proj.weight"


class PlantsMarker:
    """Unpickling this object creates a file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _edit_state(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _truncate(folder: Path, keep) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


def _pickle_instead(folder: Path, name: str) -> None:
    (folder / "model.safetensors").unlink()
    with open(folder / name, "wb") as f:
        pickle.dump({"weights": PlantsMarker(folder.parent / "UNPICKLED")}, f)


def _bad_offsets(header: dict) -> None:
    begin, end = header[Q_KEY]["data_offsets"]
    header[Q_KEY]["data_offsets"] = [begin, end - 4]  # claims fewer bytes than its shape needs


def _edit_header(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    path.write_bytes(data[:8] + raw.ljust(n) + data[8 + n :])  # the format pads its header with spaces


def _shards_index_wrong(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    weight_map = {
        k: "model-00001-of-00001.safetensors" for k in load_file(folder / "model-00001-of-00001.safetensors")
    }
    weight_map[Q_KEY] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


BAD_CHECKPOINTS = [
    (
        "truncated data",
        lambda f: _truncate(f, lambda n: n // 2),
        ["truncated safetensors", "model.safetensors", "key"],
    ),
    ("truncated header", lambda f: _truncate(f, lambda n: 100), ["truncated safetensors", "header needs"]),
    ("empty file", lambda f: _truncate(f, lambda n: 0), ["truncated safetensors", "0 bytes"]),
    (
        "not safetensors",
        lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00" + b"x" * 64),
        ["not a safetensors"],
    ),
    ("byte count", lambda f: _edit_header(f, _bad_offsets), [Q_KEY, "bytes stored for shape"]),
    (
        "trailing bytes",
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes() + b"junk"),
        ["model.safetensors", "4 bytes after the last tensor"],
    ),
    (
        "refused, no reason found here",
        lambda f: _edit_header(f, lambda h: h.update({"__metadata__": 1})),
        ["model.safetensors: not a safetensors file (", "deserializing header"],
    ),
    ("wrong shape", lambda f: _edit_state(f, lambda s: s.update({Q_KEY: torch.zeros(16, 32)})), [Q_KEY, "[16, 32]"]),
    ("missing key", lambda f: _edit_state(f, lambda s: s.pop(Q_KEY)), ["missing keys", Q_KEY]),
    (
        "unexpected key",
        lambda f: _edit_state(f, lambda s: s.update({"model.decoder.extra.weight": torch.zeros(2)})),
        ["unexpected keys", "model.decoder.extra.weight"],
    ),
    ("pickle .bin", lambda f: _pickle_instead(f, "pytorch_model.bin"), ["pytorch_model.bin", "refusing", "pickle"]),
    ("pickle .pt", lambda f: _pickle_instead(f, "model.pt"), ["model.pt", "refusing"]),
    (
        "pickle named .safetensors",
        lambda f: _pickle_instead(f, "model.safetensors"),
        ["model.safetensors", "refusing", "pickle"],
    ),
    ("no weights", lambda f: (f / "model.safetensors").unlink(), ["no model.safetensors"]),
    ("index names a missing shard", _shards_index_wrong, ["model-00002-of-00002.safetensors", "no such file"]),
]


@pytest.mark.parametrize("name,mutate,needles", BAD_CHECKPOINTS, ids=[c[0] for c in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_refused_naming_file_and_key(broken, tmp_path, name, mutate, needles):
    mutate(broken)
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint_folder(broken)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    output = tmp_path / "repo"
    with pytest.raises(CheckpointError):
        build_repo_folder(broken, output, "user/model", validate=False)
    assert_nothing_written(tmp_path, output)
    assert not (tmp_path / "UNPICKLED").exists(), "a pickle was unpickled"


def test_load_checkpoint_state_never_unpickles(tmp_path):
    marker = tmp_path / "UNPICKLED"
    for name in ("weights.safetensors", "weights.bin"):
        path = tmp_path / name
        with open(path, "wb") as f:
            pickle.dump(PlantsMarker(marker), f)
        with pytest.raises(CheckpointError, match="refusing to load a pickle"):
            load_checkpoint_state(path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "zip.safetensors")  # torch's zip format, misnamed
    with pytest.raises(CheckpointError, match="zip.safetensors: refusing"):
        load_checkpoint_state(tmp_path / "zip.safetensors")
    assert not marker.exists()
    # control: the marker object does create the file when it is unpickled, so the assertion above means something
    pickle.loads((tmp_path / "weights.bin").read_bytes())
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_what_transformers_from_pretrained_does_with_the_same_files(broken, tmp_path):
    """Why the checks above exist: transformers 5.23 loads a checkpoint with a missing key (randomly initialised,
    only logged) and refuses a malicious pickle only because torch.load runs with weights_only=True."""
    from transformers import AutoModelForCausalLM

    _edit_state(broken, lambda s: s.pop(Q_KEY))
    model, info = AutoModelForCausalLM.from_pretrained(broken, output_loading_info=True)
    assert info["missing_keys"] == {Q_KEY} and model is not None  # loaded, not refused
    _pickle_instead(broken, "pytorch_model.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        AutoModelForCausalLM.from_pretrained(broken)
    assert not (tmp_path / "UNPICKLED").exists()


def test_load_pretrained_safely_loads_a_good_folder_and_refuses_a_bad_one(broken):
    from course_transformer.core.checkpoint import load_pretrained_safely

    model = load_pretrained_safely(broken)
    assert type(model).__name__ == "CourseTransformerForCausalLM"
    _edit_state(broken, lambda s: s.update({"lm_head.extra": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="unexpected keys lm_head.extra"):
        load_pretrained_safely(broken)


def test_every_torch_load_in_the_project_is_weights_only():
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in [
        p for d in ("modeling", "evaluation", "course_transformer", "scripts") for p in (root / d).rglob("*.py")
    ]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(root)}:{number}")
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------------------------
# 4. Command-line arguments
# ---------------------------------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


BAD_CLI = [
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ([], 2, "required: COMMAND"),
    (["publish", "{src}"], 2, "--repo-id"),
    (["publish", "{src}", "--repo-id", "no-slash"], 1, "'no-slash' is not a Hub repository id"),
    (["publish", "{src}", "--repo-id", "user/name", "--license", "Apache 2.0"], 1, "--license 'Apache 2.0'"),
    (["publish", "{src}", "--repo-id", "user/name", "--output", "{src}"], 1, "is the source folder"),
    (["publish", "{src}", "--repo-id", "user/name", "--output", "{exists}"], 1, "exists; pass --overwrite"),
    (["publish", "{tmp}/nowhere", "--repo-id", "user/name"], 1, "nowhere: not a folder"),
    (["publish", "{src}", "--repo-id", "user/name", "--timeout", "soon"], 2, "invalid float value: 'soon'"),
]


@pytest.mark.parametrize("argv,code,needle", BAD_CLI)
def test_bad_command_line_fails_with_one_clear_line(broken, tmp_path, capsys, argv, code, needle):
    (tmp_path / "exists").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    values = {"src": str(broken), "exists": str(tmp_path / "exists"), "tmp": str(tmp_path)}
    status, err = run_cli([a.format(**values) for a in argv], capsys)
    assert status == code and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert [line for line in err.splitlines() if "error" in line], err


# ---------------------------------------------------------------------------------------------------------------
# 5. Data files read while publishing
# ---------------------------------------------------------------------------------------------------------------


def _results(text: str):
    def write(folder: Path) -> Path:
        path = folder.parent / "results.json"
        path.write_text(text)
        return path

    return write


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


BAD_DATA_FILES = [
    ("results: invalid JSON", _results('{"metrics": {"ppl": 3.1,}}'), "results.json: invalid JSON"),
    ("results: no metric", _results('{"model": "tiny", "notes": "none"}'), "no numeric metric"),
    ("results: text value", _results('{"metrics": {"bleu": "high"}}'), "metric 'bleu' has value 'high'"),
    ("results: NaN value", _results('{"metrics": {"ppl": NaN}}'), "metric 'ppl' has value nan"),
    ("results: entry without value", _results('{"results": [{"metric": "ppl"}]}'), "results[0] needs"),
    ("results: missing file", lambda f: f.parent / "absent.json", "absent.json: no such file"),
    ("tokenizer: missing", _no_tokenizer, "no loadable tokenizer"),
    ("tokenizer: corrupt", lambda f: (f / "tokenizer.json").write_text("{not json"), "no loadable tokenizer"),
    ("generation config: corrupt", lambda f: (f / "generation_config.json").write_text("{"), "generation_config.json"),
]


@pytest.mark.parametrize("name,mutate,needle", BAD_DATA_FILES, ids=[c[0] for c in BAD_DATA_FILES])
def test_bad_data_file_fails_before_anything_is_published(broken, tmp_path, name, mutate, needle):
    results = mutate(broken)
    results = results if isinstance(results, Path) else None  # only the results cases return a file
    output = tmp_path / "repo"
    with pytest.raises(PublishError) as err:
        build_repo_folder(broken, output, "user/model", results_file=results, validate=False)
    assert needle in str(err.value), str(err.value)
    assert_nothing_written(tmp_path, output)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    source = tmp_path / "small-vocab"
    tiny_model("decoder", vocab_size=16).save_pretrained(source)
    build_tokenizer().save_pretrained(source)  # ~35 tokens for a 16-row embedding table
    output = tmp_path / "repo"
    with pytest.raises(PublishError, match=r"tokenizer has \d+ tokens but config.json has vocab_size=16"):
        build_repo_folder(source, output, "user/model", validate=False)
    assert_nothing_written(tmp_path, output)


def test_a_failed_rebuild_keeps_the_previous_folder(saved, tmp_path):
    """--overwrite replaces the output only after a successful build: a failure leaves the old one intact."""
    output = tmp_path / "repo"
    output.mkdir()
    (output / "README.md").write_text("previous build")
    bad = tmp_path / "results.json"
    bad.write_text("[]")
    with pytest.raises(PublishError, match="expected a JSON object"):
        build_repo_folder(saved, output, "user/model", results_file=bad, overwrite=True, validate=False)
    assert sorted(p.name for p in output.iterdir()) == ["README.md"]
    assert (output / "README.md").read_text() == "previous build"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]
