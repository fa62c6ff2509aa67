"""Training data: find source files, hold some out by file, train a byte-level BPE, pack sequences.

    files = find_files([stdlib_dir()], "*.py")               # site-packages excluded
    train_files, heldout_files = split_files(files, holdout=0.02)
    texts = read_texts(train_files)
    tok = train_tokenizer(texts, vocab_size=6144)
    windows = pack(tok, texts, seq_len=256)                   # [N, 257] int32: inputs + next token

Documents are packed back to back as `<bos> text <eos>` into one token stream that is cut into
windows of seq_len + 1 tokens overlapping by one, so every token is a target exactly once. The
held-out split is by file, from a hash of the file's path relative to its corpus root: the same on
every machine and independent of which other files exist.
"""

import ast
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from moela.errors import MoelaError

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [BOS, EOS] + [f"<|{r}|>" for r in ROLES]  # ids 0, 1, ... (bos 0, eos 1 as in DeepSeek-V3)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
DEFAULT_EXCLUDE = ("*site-packages/*", "*dist-packages/*")


class CorpusError(MoelaError):
    """The training corpus is missing, empty, or too small for one sequence."""


@dataclass(frozen=True)
class SourceFile:
    root: Path
    rel: str  # posix path relative to root: what the held-out hash sees

    @property
    def path(self) -> Path:
        return self.root / self.rel


def stdlib_dir() -> Path:
    """The standard library source of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_files(roots: list[Path], pattern: str = "*.py", exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> list[SourceFile]:
    files = []
    for root in roots:
        if not root.exists():
            raise CorpusError(f"{root}: corpus path does not exist")
        if root.is_file():
            files.append(SourceFile(root.parent, root.name))
            continue
        for p in sorted(root.rglob(pattern)):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not any(fnmatch(rel, e) for e in exclude):
                files.append(SourceFile(root, rel))
    if not files:
        raise CorpusError(f"empty corpus: no files matching '{pattern}' under {', '.join(map(str, roots))}")
    return files


def _hash_fraction(rel: str) -> float:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:12], 16) / 16**12


def split_files(files: list[SourceFile], holdout: float) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, held-out): a file is held out when the hash of its relative path falls below `holdout`."""
    heldout = [f for f in files if _hash_fraction(f.rel) < holdout]
    if holdout > 0 and not heldout and len(files) > 1:  # tiny corpora: still hold out one file, the lowest hash
        heldout = [min(files, key=lambda f: _hash_fraction(f.rel))]
    held = set(heldout)
    train = [f for f in files if f not in held]
    if not train:
        raise CorpusError(f"every one of the {len(files)} corpus files is held out (holdout={holdout}); add files")
    return train, heldout


def read_texts(files: list[SourceFile], docstrings: bool = True) -> list[str]:
    """File contents; files that are not UTF-8 or are empty are left out. docstrings=False: `.py` files
    go through strip_docstrings."""
    texts = []
    for f in files:
        try:
            text = f.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if not docstrings and f.rel.endswith(".py"):
            text = strip_docstrings(text)
        if text.strip():
            texts.append(text)
    return texts


def strip_docstrings(source: str) -> str:
    """Python source without its module, class and function docstrings: each docstring's lines go,
    and a body that was only a docstring becomes `pass`. Comments and every other line stay as they
    are. A docstring that shares a line with other code, and a file that does not parse, stay whole."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source
    lines = source.splitlines(keepends=True)
    edits = {}  # first line index -> (last line index, replacement)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not body:
            continue
        doc = body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        first, last = doc.lineno - 1, doc.end_lineno - 1
        if lines[first][: doc.col_offset].strip() or lines[last][doc.end_col_offset :].strip():
            continue
        edits[first] = (last, [] if len(body) > 1 else [lines[first][: doc.col_offset] + "pass\n"])
    out, i = [], 0
    while i < len(lines):
        if i in edits:
            last, replacement = edits[i]
            out += replacement
            i = last + 1
        else:
            out.append(lines[i])
            i += 1
    return "".join(out)


def fingerprint(files: list[SourceFile], docstrings: bool = True) -> str:
    """Identity of a file list (names and sizes) as read_texts reads it, stored in checkpoints to catch a
    changed corpus on resume."""
    h = hashlib.sha256(b"" if docstrings else b"strip-docstrings\n")
    for f in files:
        h.update(f"{f.rel}\0{f.path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (every byte is a token, so any text encodes); encode() prepends <bos>."""
    if not texts:
        raise CorpusError("empty corpus: no non-empty UTF-8 text to train the tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def save_tokenizer(tok: Tokenizer, path: Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (bos/eos, chat template), readable by moela and transformers."""
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
              "add_bos_token": True, "add_eos_token": False, "model_max_length": model_max_length,
              "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def pack(tok: Tokenizer, texts: list[str], seq_len: int, chunk: int = 256) -> torch.Tensor:
    """Token windows [N, seq_len + 1]: window i holds stream[i * seq_len : (i + 1) * seq_len + 1]."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    pieces = []
    for i in range(0, len(texts), chunk):
        for enc in tok.encode_batch_fast(texts[i : i + chunk], add_special_tokens=False):
            pieces += [np.array([bos], np.int32), np.asarray(enc.ids, np.int32), np.array([eos], np.int32)]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise CorpusError(f"corpus too small: {len(stream)} tokens, fewer than one sequence of {seq_len + 1}")
    return torch.from_numpy(stream[: n * seq_len + 1]).unfold(0, seq_len + 1, seq_len)  # [N, S + 1] view
