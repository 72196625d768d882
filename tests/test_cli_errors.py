"""Bad input on the command line: one line naming the problem and the fix, exit code 2, checked before the model
loads, nothing written. Also the one model loader every command shares (pos_swap.loading)."""

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
