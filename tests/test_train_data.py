"""moela.train.data: file discovery, the held-out split by file, BPE training, packing."""

import pytest
import torch

from moela.tokenizer import Tokenizer
from moela.train import data


def write_corpus(root, n_files: int = 12) -> None:
    for i in range(n_files):
        (root / f"mod_{i}.py").write_text(f"def f_{i}(x):\n    return x * {i}\n\n\nclass C{i}:\n    pass\n" * 3)


def test_find_files_skips_site_packages_and_sorts(tmp_path):
    write_corpus(tmp_path, 3)
    (tmp_path / "site-packages" / "pkg").mkdir(parents=True)
    (tmp_path / "site-packages" / "pkg" / "x.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not python")
    files = data.find_files([tmp_path], "*.py")
    assert [f.rel for f in files] == ["mod_0.py", "mod_1.py", "mod_2.py"]


def test_empty_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(data.CorpusError, match="empty corpus"):
        data.find_files([tmp_path], "*.py")
    with pytest.raises(data.CorpusError, match="does not exist"):
        data.find_files([tmp_path / "missing"], "*.py")


def test_split_is_by_file_and_deterministic(tmp_path):
    write_corpus(tmp_path, 40)
    files = data.find_files([tmp_path])
    train, heldout = data.split_files(files, 0.25)
    assert heldout and train and not set(train) & set(heldout) and len(train) + len(heldout) == 40
    # a file's fate depends on its own path only: dropping other files changes nothing
    half = files[::2]
    assert set(data.split_files(half, 0.25)[1]) == set(half) & set(heldout)
    assert data.split_files(files[:1], 0.01) == (files[:1], [])  # a lone file is never held out


def test_tokenizer_round_trips_and_adds_bos(tmp_path):
    write_corpus(tmp_path)
    texts = data.read_texts(data.find_files([tmp_path]))
    tok = data.train_tokenizer(texts, vocab_size=300)
    data.save_tokenizer(tok, tmp_path / "tok", model_max_length=64)
    ours = Tokenizer.from_pretrained(tmp_path / "tok")
    ids = ours.encode("def f_3(x):\n    return x * 3 🙂")
    assert ids[0] == ours.bos_token_id == 0 and ours.eos_token_id == 1
    assert ours.decode(ids) == "def f_3(x):\n    return x * 3 🙂"
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat == "<|begin_of_text|><|user|>\nhi<|end_of_text|>\n<|assistant|>\n"


def test_pack_cuts_overlapping_windows(tmp_path):
    write_corpus(tmp_path, 4)
    texts = data.read_texts(data.find_files([tmp_path]))
    tok = data.train_tokenizer(texts, vocab_size=300)
    windows = data.pack(tok, texts, seq_len=16)
    stream = []
    for t in texts:
        stream += [0] + tok.encode(t, add_special_tokens=False).ids + [1]
    assert windows.shape[1] == 17 and len(windows) == (len(stream) - 1) // 16
    assert torch.equal(windows[1], torch.tensor(stream[16:33], dtype=torch.int32))
    assert torch.equal(windows[0, -1], windows[1, 0])  # each token is a target exactly once
    with pytest.raises(data.CorpusError, match="too small"):
        data.pack(tok, texts[:1], seq_len=10_000)


def test_read_texts_skips_non_utf8_and_empty(tmp_path):
    (tmp_path / "a.py").write_bytes(b"x = '\xff\xfe'\n")
    (tmp_path / "b.py").write_text("")
    (tmp_path / "c.py").write_text("y = 2\n")
    assert data.read_texts(data.find_files([tmp_path])) == ["y = 2\n"]


def test_strip_docstrings_drops_docstrings_and_keeps_code_and_comments():
    source = ('"""Module."""\nimport os\n\n\nclass A:\n    """Class\n    doc."""\n\n'
              '    def f(self, n):\n        r"""One line."""\n        # why\n        return n  # keep\n\n'
              '    async def g(self):\n        """Only a docstring."""\n\n\n'
              'def h(): "same line"; return 1\n\n\ndef k():\n    """Doc."""  # a comment after it\n    x = """not a docstring"""\n')
    out = data.strip_docstrings(source)
    assert out == ('import os\n\n\nclass A:\n\n    def f(self, n):\n        # why\n        return n  # keep\n\n'
                   '    async def g(self):\n        pass\n\n\n'
                   'def h(): "same line"; return 1\n\n\ndef k():\n    """Doc."""  # a comment after it\n    x = """not a docstring"""\n')
    compile(out, "<stripped>", "exec")  # still Python
    assert data.strip_docstrings("def broken(:\n    '''doc'''\n") == "def broken(:\n    '''doc'''\n"  # unparsable: whole


def test_read_texts_without_docstrings_and_its_fingerprint(tmp_path):
    (tmp_path / "a.py").write_text('def f():\n    """Doc."""\n    return 1\n')
    (tmp_path / "b.txt").write_text('"""not Python"""\n')
    files = data.find_files([tmp_path], "*")
    assert data.read_texts(files, docstrings=False) == ["def f():\n    return 1\n", '"""not Python"""\n']
    assert data.read_texts(files) == ['def f():\n    """Doc."""\n    return 1\n', '"""not Python"""\n']
    assert data.fingerprint(files, docstrings=False) != data.fingerprint(files)  # resuming with the other reading fails
