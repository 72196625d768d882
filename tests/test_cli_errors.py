"""Bad input on the command line: one line naming the problem and the fix, exit code 2, checked before the model
loads, nothing written. Also the one model loader every command shares (pos_swap.loading)."""

from pathlib import Path

import pytest
import torch
import transformers as T

import pos_swap
from pos_swap import engine, loading
from pos_swap.cli import main
from conftest import tiny


def byte_tokenizer() -> T.PreTrainedTokenizerFast:
    """One token per UTF-8 byte (256 tokens, no merges): real text for tiny models, no download, no conversion."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE({char: index for index, char in enumerate(alphabet)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return T.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaMA (32 trained positions) with a byte tokenizer, saved as a folder the CLI loads."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama", vocab_size=256).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def no_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("no-tokenizer")
    tiny("llama", vocab_size=256).save_pretrained(path)
    return path


@pytest.fixture
def no_weights_load(monkeypatch):
    """Fail the test if any command gets as far as loading weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad input was refused")

    monkeypatch.setattr(engine, "from_pretrained", refuse)


def one_line_error(argv, capsys) -> str:
    """Run the CLI; assert exit code 2 and a single error line without a traceback; return that line."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as done:
        code = done.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("pos-swap")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# -- the loader ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["probe", "/nonexistent", "--out", "OUT"], "No model folder at '/nonexistent'"),
        (["eval", "./no-such-model", "--lengths", "16"], "No model folder at './no-such-model'"),
        (["finetune", "a/b/c", "--scheme", "alibi", "--out", "OUT"], "No model folder at 'a/b/c'"),
        (["probe", "NO_TOKENIZER", "--out", "OUT"], "has no tokenizer"),
        (["eval", "MODEL", "--device", "foo", "--lengths", "16"], "Cannot use device 'foo'"),
        (["eval", "MODEL", "--dtype", "int8", "--lengths", "16"], "invalid choice: 'int8'"),
        (["info", "MODEL/config.json"], "is a file; give the model's folder"),
        (["info", "offline:smollm3"], "Unknown offline checkpoint 'offline:smollm3'"),
        (["eval", "MODEL", "--tasks", "ruler:niah_singel_1", "--lengths", "16"], "Did you mean 'niah_single_1'?"),
        (["eval", "MODEL", "--tasks", "ppl,needle", "--lengths", "16"], "or lm-eval's RULER tasks as ruler:NAME"),
    ],
)  # fmt: skip
def test_a_model_that_cannot_load_is_one_line(model_dir, no_tokenizer_dir, tmp_path, capsys, no_weights_load,
                                              argv, message):  # fmt: skip
    names = {"MODEL": str(model_dir), "NO_TOKENIZER": str(no_tokenizer_dir), "OUT": str(tmp_path / "out")}
    argv = [names.get(a, a.replace("MODEL", str(model_dir))) for a in argv]
    assert message in one_line_error(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_the_loader_refuses_before_the_weights_load(model_dir, no_weights_load):
    with pytest.raises(pos_swap.PosSwapError, match="Cannot use device 'foo'"):
        loading.load(model_dir, device="foo")
    with pytest.raises(pos_swap.PosSwapError, match="Unknown dtype 'int8'.*float32"):
        loading.load(model_dir, dtype="int8")


def test_hub_names_pass_through_and_aliases_resolve(monkeypatch, tmp_path):
    """A name that could be a Hub repository goes to transformers (which downloads it); only names that cannot be
    one and are not folders are refused; offline aliases resolve to their folders."""
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M"):
        assert loading.model_path(name) == name
    monkeypatch.setattr(pos_swap.offline, "minilm", lambda: tmp_path)
    assert loading.model_path("offline:minilm") == str(tmp_path)


def test_one_loader_gives_the_saved_model_with_its_patch(model_dir, tmp_path):
    """The model, patch re-applied, in the dtype asked for (or the checkpoint's), and its tokenizer."""
    saved = tmp_path / "yarn"
    model = tiny("llama", vocab_size=256)
    pos_swap.patch(model, "yarn", factor=4.0)
    model.save_pretrained(saved)
    loaded, tokenizer = loading.load(saved, require_tokenizer=False)
    assert tokenizer is None and pos_swap.describe(loaded)["params"]["factor"] == 4.0
    ids = torch.randint(3, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    half, tokenizer = loading.load(model_dir, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and tokenizer("ab").input_ids == [64, 65]


def test_the_memory_check_counts_reclaimable_memory(model_dir, monkeypatch):
    """Free pages are a fraction of what a process can get (the page cache is reclaimable): the check reads
    psutil's ``available`` (MemAvailable), so a run that fits in it is not refused for lack of free pages."""
    import collections

    import psutil

    from pos_swap.evaluate import ppl

    memory = collections.namedtuple("Memory", "total available free")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(16 * 2**30, 8 * 2**30, 2**20))
    assert ppl.available_memory() == 8 * 2**30
    config = T.AutoConfig.from_pretrained(model_dir)
    assert 2**20 < ppl.estimate_memory(config, 1024) < 8 * 2**30
    loading.load(model_dir, longest=1024)  # fits in the available 8 GiB, not in the free 1 MiB
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(16 * 2**30, 2**20, 2**20))
    with pytest.raises(pos_swap.PosSwapError, match="GiB is free"):
        loading.load(model_dir, longest=1024)


# -- settings, texts and output folders -------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    """Names the bad-input table uses: a Latin-1 file, a folder, a folder holding a Latin-1 .txt, an unwritable one."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait, na\xefve\n".encode("latin-1") * 50)
    (tmp_path / "folder").mkdir()
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("fine UTF-8: caf\u00e9\n")
    (tmp_path / "mixed" / "b.txt").write_bytes(latin1.read_bytes())
    return {"LATIN1": latin1, "FOLDER": tmp_path / "folder", "MIXED": tmp_path / "mixed",
            "READ_ONLY": unwritable(tmp_path) / "out"}  # fmt: skip


def unwritable(tmp_path):
    """A folder this process cannot write into: a 0o555 one, or (as root, who writes there anyway) /sys."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()
    try:
        (Path("/sys") / "pos-swap-probe").touch()
    except OSError:
        return Path("/sys")
    pytest.skip("no unwritable folder to test with")


FINETUNE = ["finetune", "MODEL", "--scheme", "alibi", "--out", "OUT"]
PROBE = ["probe", "MODEL", "--out", "OUT"]
EVAL = ["eval", "MODEL", "--lengths", "16", "--out", "OUT"]


BAD_SETTINGS = [
    (FINETUNE + ["--eval-factors", "0"], "--eval-factors must be whole multiples of --seq-len, at least 1"),
    (FINETUNE + ["--eval-factors", "1,a"], "expected whole numbers separated by commas"),
    (FINETUNE + ["--lora-rank", "-1"], "--lora-rank must be a whole number of at least 0; got -1"),
    (FINETUNE + ["--learning-rate", "nan"], "--learning-rate must be a finite number above 0; got nan"),
    (FINETUNE + ["--learning-rate", "inf"], "--learning-rate must be a finite number above 0; got inf"),
    (FINETUNE + ["--lora-alpha", "0"], "--lora-alpha must be a finite number above 0"),
    (FINETUNE + ["--save-steps", "0"], "--save-steps must be a whole number of at least 1"),
    (FINETUNE + ["--text", "LATIN1"], "is not UTF-8 text (byte 3"),
    (FINETUNE + ["--text", "MIXED"], "b.txt' is not UTF-8 text"),
    (FINETUNE + ["--out", "READ_ONLY"], "Cannot write to"),
    (PROBE + ["--text", "LATIN1"], "is not UTF-8 text (byte 3"),
    (PROBE + ["--text", "FOLDER"], "is a folder; give a UTF-8 text file"),
    (PROBE + ["--length", "-5"], "--length must be a whole number of at least 10"),
    (PROBE + ["--length", "0"], "--length must be a whole number of at least 10 (5-fold cross-validation"),
    (PROBE + ["--seeds", "0"], "--seeds must be a whole number of at least 1; got 0"),
    (PROBE + ["--pairs", "3"], "--pairs must be a whole number of at least 10"),
    (PROBE + ["--probe-windows", "0"], "--probe-windows must be a whole number of at least 1"),
    (PROBE + ["--query-rows", "-2"], "--query-rows must be a whole number of at least 1"),
    (PROBE + ["--out", "READ_ONLY"], "Cannot write to"),
    (EVAL + ["--text", "LATIN1"], "is not UTF-8 text (byte 3"),
    (EVAL + ["--text", "FOLDER"], "is a folder; give a UTF-8 text file"),
    (EVAL + ["--out", "READ_ONLY"], "Cannot write to"),
    (["recommend", "MODEL", "--length", "64", "--text", "LATIN1"], "is not UTF-8 text"),
]  # fmt: skip


@pytest.mark.parametrize("argv, message", BAD_SETTINGS, ids=[f"{a[0]} {a[-2]} {a[-1]}" for a, _ in BAD_SETTINGS])
def test_bad_settings_texts_and_folders_are_refused_before_loading(model_dir, files, tmp_path, capsys, no_weights_load,
                                                                   argv, message):  # fmt: skip
    names = {"MODEL": model_dir, "OUT": tmp_path / "out", **files}
    assert message in one_line_error([names.get(a, a) for a in argv], capsys)
    assert not (tmp_path / "out").exists() and not files["READ_ONLY"].exists()


BAD_SCHEMES = [
    (["patch", "MODEL", "--scheme", "yarn:factor=nan", "--out", "OUT"], "'factor' of scheme 'yarn' must be finite"),
    (["patch", "MODEL", "--scheme", "self-extend:window=10:group=4", "--out", "OUT"],
     "window divisible by the group"),
    (["patch", "MODEL", "--scheme", "sinks", "--window", "0", "--out", "OUT"],  # the per-parameter flag form
     "'window' of scheme 'sinks' must be > 0"),
    (["probe", "MODEL", "--scheme", "rerope:window=0", "--out", "OUT"], "'window' of scheme 'rerope' must be > 0"),
    (["probe", "MODEL", "--scheme", "alibi:slopes=0.5;0.25", "--out", "OUT"],
     "one slope per attention head: 4 for this model, got 2"),
    (["finetune", "MODEL", "--scheme", "dynamic-yarn:max_factor=0.5", "--out", "OUT"],
     "'max_factor' of scheme 'dynamic-yarn' must be > 1"),
    (["finetune", "MODEL", "--scheme", "rerope:window=8:temperature=logn:temperature_length=1", "--out", "OUT"],
     "'temperature_length' of modifier 'temperature'"),
    (["eval", "MODEL", "--schemes", "native,rerope:window=8:temperature=logn:temperature_length=1", "--lengths", "16",
      "--out", "OUT"], "'temperature_length' of modifier 'temperature'"),
]  # fmt: skip


@pytest.mark.parametrize("argv, message", BAD_SCHEMES, ids=[f"{a[0]} {a[3]}" for a, _ in BAD_SCHEMES])
def test_scheme_values_are_refused_before_the_weights_load(model_dir, tmp_path, capsys, no_weights_load, argv, message):
    """patch, probe, finetune and eval check a scheme's values (and its modifiers') on the model's skeleton: with
    weight loading refused (``no_weights_load``), a check made after loading would fail the test instead."""
    names = {"MODEL": model_dir, "OUT": tmp_path / "out"}
    assert message in one_line_error([names.get(a, a) for a in argv], capsys)
    assert not (tmp_path / "out").exists()


def test_the_check_before_loading_takes_modifier_keywords(model_dir):
    """The skeleton check accepts what ``pos_swap.patch`` accepts: a scheme with a modifier's keywords."""
    scheme, modifiers = engine.configure(loading.skeleton(T.AutoConfig.from_pretrained(model_dir)), "rerope",
                                         {"window": 8, "temperature": "logn"})  # fmt: skip
    assert (scheme.name, scheme.config.window, [m.name for m in modifiers]) == ("rerope", 8, ["temperature"])


def test_utf8_text_reads_exactly_and_nothing_else_is_decoded(tmp_path):
    text = "na\u00efve caf\u00e9 \u2014 \u65e5\u672c\n"
    (tmp_path / "utf8.txt").write_text(text, encoding="utf-8")
    assert loading.read_text(tmp_path / "utf8.txt") == text
    (tmp_path / "latin1.txt").write_bytes(text[:11].encode("latin-1"))
    with pytest.raises(pos_swap.PosSwapError, match="not UTF-8"):
        loading.read_text(tmp_path / "latin1.txt")


def test_a_probe_with_bad_settings_writes_nothing(tmp_path):
    from pos_swap.probe.run import run_probe

    for bad in (dict(seeds=0), dict(length=0), dict(pairs=5)):
        with pytest.raises(pos_swap.PosSwapError, match="must be a whole number"):
            run_probe(tiny("llama"), byte_tokenizer(), tmp_path / "probe", text="x " * 200, window=16, windows=2, **bad)
    assert not (tmp_path / "probe").exists()


def test_probe_refuses_a_used_folder_without_advising_resume(model_dir, tmp_path, capsys, no_weights_load):
    from pos_swap.report import RunFolder

    RunFolder(tmp_path / "out", kind="probe", meta={}, results="probe.json").add({"key": "native"})
    line = one_line_error(["probe", model_dir, "--out", tmp_path / "out"], capsys)
    assert "--overwrite to replace it" in line and "--resume" not in line
    from pos_swap.probe.run import run_probe

    with pytest.raises(pos_swap.PosSwapError, match="--overwrite to replace it") as refused:
        run_probe(tiny("llama"), byte_tokenizer(), tmp_path / "out", text="x " * 200, window=16, windows=2)
    assert "--resume" not in str(refused.value)


def test_long_texts_tokenize_without_touching_the_tokenizer(monkeypatch):
    """A text longer than the tokenizer's model_max_length tokenizes whole, without the "sequence too long"
    warning and without changing the tokenizer (it used to be mutated and restored around the call)."""
    tokenizer = byte_tokenizer()
    tokenizer.model_max_length = 8
    seen = []  # the limit the tokenizer has while it runs
    original = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: seen.append(self.model_max_length) or original(self, *a, **k))
    ids = loading.tokenize(tokenizer, "twenty-one bytes long", "label")
    assert tokenizer.decode(ids) == "twenty-one bytes long" and len(ids) == 21
    assert seen == [8] and tokenizer.model_max_length == 8
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tokenizer.deprecation_warnings  # not warned
