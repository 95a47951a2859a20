"""SFT data sets an admin gives: read, validated with a report a person can act on, and kept
in the data folder under their content hash.

    python app.py dataset check train.jsonl [--heldout questions.jsonl] --as ADMIN
    python app.py dataset add train.jsonl [--heldout questions.jsonl] --as ADMIN   # prints the hash
    python app.py train --sft train.jsonl [--heldout questions.jsonl] --as ADMIN

Formats read (one JSON object per line, or a ``datasets`` folder saved with
``save_to_disk``, whose "train" and "test" splits are the two files):

- messages, as TRL's SFT trainer reads them: ``{"messages": [{"role": "user", "content":
  ...}, {"role": "assistant", "content": ...}]}``; the loss is on the last assistant message;
- prompt/completion: ``{"prompt": "...", "completion": "..."}``, or each a list of messages
  (TRL's conversational prompt-completion form).

Optional fields: ``id`` (kept), and on held-out rows ``expect``: words of which one must be
in an answer for it to count as right (the gate's domain check; without it an answer
counts as right when its words are close to the reference answer's).

Nothing trains unless the report is clean (``DatasetReport.ok``): a file over
``MAX_FILE_BYTES`` is refused before it is read; empty files, rows that are not one of the
formats, texts over the chat page's limit, texts no store can hold (NUL, lone surrogates,
other control characters such as terminal escapes), duplicate rows, and held-out
questions that are also training questions (a leak) are errors, each named with its line.
Rows longer than the training context (``TrainConfig.max_length``) are a warning: they are
cut, and the report says how many and by how much.

The stored form (``store_dataset``) is one canonical JSON line per row, ``{"id",
"messages", "split", "expect"?}``, at ``<data_dir>/datasets/<sha256>.jsonl``; the hash is of
that file, so the same data given in either format is the same data set. Jobs name a data
set by that hash (``TrainConfig.dataset``), never by a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from assistant.chat import MAX_MESSAGE_CHARS

# 20 MB: 20,000 rows of 1 kB, far past what trains in hours on a CPU, small enough to read
# and check in memory. A bigger file is refused from its size alone, before it is read.
MAX_FILE_BYTES = 20_000_000
# Rows per file: an epoch of 20,000 short rows is about a day on two cores.
MAX_ROWS = 20_000
# Per message: the chat page's own limit, so nothing trains that a user could not send.
MAX_TEXT_CHARS = MAX_MESSAGE_CHARS
# Errors shown per kind: enough to find the pattern, not a wall of text for a broken file.
SHOWN = 5
ROLES = ("system", "user", "assistant")
HASH = re.compile(r"[0-9a-f]{64}")
# C0 and C1 controls except tab, newline, carriage return: NUL cannot be stored by every
# store (docs/faults.md), escapes (\x1b[...) rewrite terminals that print the data.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class DatasetError(ValueError):
    """The data set cannot be read at all (too big, not there); the message says why."""


@dataclass
class DatasetReport:
    """What was found in a data set; ``ok`` only with no errors and rows to train on."""

    source: str
    format: str = "unknown"
    rows: list[dict] = field(default_factory=list)  # normalized training rows
    heldout: list[dict] = field(default_factory=list)  # normalized held-out rows
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    hash: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.rows)

    def as_dict(self) -> dict:
        """What the job, the version and the console record (no texts)."""
        return {"source": self.source, "format": self.format, "rows": len(self.rows), "heldout_rows": len(self.heldout),
                "errors": self.errors, "warnings": self.warnings, "stats": self.stats, "hash": self.hash, "ok": self.ok}

    def text(self) -> str:
        out = [f"data set {self.source}: {self.format}, {len(self.rows)} training rows, {len(self.heldout)} held-out rows"]
        if self.stats:
            s = self.stats
            out.append(f"  tokens per row: mean {s.get('mean_tokens')}, max {s.get('max_tokens')}; "
                       f"context {s.get('max_length')} tokens")
        out += [f"  ERROR   {e}" for e in self.errors]
        out += [f"  warning {w}" for w in self.warnings]
        if self.ok:
            out.append("  OK: nothing refused" + (f"; hash {self.hash}" if self.hash else ""))
        else:
            out.append("  REFUSED: nothing will train on this data set until the errors are fixed"
                       if self.errors else "  REFUSED: no rows to train on")
        return "\n".join(out)


# -- reading --------------------------------------------------------------------------------


def read_bytes_limited(path: Path, limit: int | None = None) -> bytes:
    """A file's bytes, refused from its size before it is read (and again while reading,
    for files that grow or lie about their size); ``limit`` defaults to MAX_FILE_BYTES."""
    limit = MAX_FILE_BYTES if limit is None else limit
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} is not a file")
    size = path.stat().st_size
    if size > limit:
        raise DatasetError(f"{path.name} is {size:,} bytes; the limit is {limit:,}")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DatasetError(f"{path.name} is over the limit of {limit:,} bytes")
    return data


def parse_jsonl(data: bytes, where: str, errors: list[str]) -> list[tuple[int, object]]:
    """(line number, object) per non-blank line; unreadable lines become errors."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.append(f"{where}: not UTF-8 text (byte {e.start})")
        return []
    out, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(out) + len(bad) >= MAX_ROWS:
            errors.append(f"{where}: more than {MAX_ROWS:,} rows; split it or keep the best")
            break
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            bad.append(f"line {n}: {e.msg}")
    if bad:
        errors.append(f"{where}: {len(bad)} line(s) are not JSON: " + "; ".join(bad[:SHOWN]) + _more(bad))
    return out


def _more(items: list) -> str:
    return f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else ""


def _messages(value, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant" if what == "completion" else "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be text or a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f"each message needs a role ({', '.join(ROLES)}) and text content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def normalize(record: object) -> tuple[str, dict]:
    """(format, ``{"messages", "expect"?, "id"?}``) of one row; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("a row must be a JSON object")
    if "messages" in record:
        fmt, messages = "messages", _messages(record["messages"], "messages")
    elif "prompt" in record and "completion" in record:
        fmt = "prompt/completion"
        messages = _messages(record["prompt"], "prompt") + _messages(record["completion"], "completion")
    else:
        raise ValueError(f"no 'messages' and no 'prompt' + 'completion' (keys: {', '.join(sorted(record)[:8]) or 'none'})")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (the answer to learn)")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("no user message")
    for m in messages:
        if not m["content"].strip():
            raise ValueError(f"an empty {m['role']} message")
        if len(m["content"]) > MAX_TEXT_CHARS:
            raise ValueError(f"a {m['role']} message of {len(m['content']):,} characters (limit {MAX_TEXT_CHARS:,})")
        if _SURROGATE.search(m["content"]):
            raise ValueError("text no store can hold (a lone surrogate)")
        bad = _CONTROL.search(m["content"])
        if bad:
            name = "NUL" if bad.group() == "\x00" else f"control character U+{ord(bad.group()):04X}"
            raise ValueError(f"text no store can hold or print safely ({name})")
    out: dict = {"messages": messages}
    expect = record.get("expect")
    if expect is not None:
        if isinstance(expect, str):
            expect = [expect]
        if not isinstance(expect, list) or not all(isinstance(e, str) and e.strip() for e in expect):
            raise ValueError("'expect' must be a word or a list of words")
        out["expect"] = [e.strip() for e in expect]
    if isinstance(record.get("id"), (str, int)) and str(record["id"]).strip():
        out["id"] = str(record["id"])[:200]
    return fmt, out


def _key(messages: list[dict]) -> str:
    """Rows that read the same to a person are duplicates: case and spacing folded."""
    return "\n".join(f"{m['role']}:{' '.join(unicodedata.normalize('NFKC', m['content']).lower().split())}"
                     for m in messages)


def _question_key(row: dict) -> str:
    return _key(row["messages"][:-1])


def _check_rows(items: list[tuple[int, object]], where: str, report: DatasetReport) -> list[dict]:
    rows, formats, problems = [], set(), []
    for n, record in items:
        try:
            fmt, row = normalize(record)
        except ValueError as e:
            problems.append(f"line {n}: {e}")
            continue
        formats.add(fmt)
        row["line"] = n
        rows.append(row)
    if problems:
        report.errors.append(f"{where}: {len(problems)} row(s) refused: " + "; ".join(problems[:SHOWN]) + _more(problems))
    if formats:
        report.format = " + ".join(sorted(formats))
    seen: dict[str, int] = {}
    dups = []
    for r in rows:
        k = _key(r["messages"])
        if k in seen:
            dups.append(f"line {r['line']} repeats line {seen[k]}")
        else:
            seen[k] = r["line"]
    if dups:
        report.errors.append(f"{where}: {len(dups)} duplicate row(s): " + "; ".join(dups[:SHOWN]) + _more(dups)
                             + "; remove them (a repeated row weighs twice)")
    return rows


def check_dataset(train: list[tuple[int, object]], heldout: list[tuple[int, object]] | None = None, *,
                  source: str = "data set", tokenizer=None, max_length: int = 512,
                  errors: list[str] | None = None) -> DatasetReport:
    """The report on parsed rows (``parse_jsonl``); with a tokenizer, rows the context cuts."""
    report = DatasetReport(source=source, errors=list(errors or []))
    rows = _check_rows(train, "training rows", report)
    held = _check_rows(heldout or [], "held-out rows", report) if heldout else []
    if not train and not report.errors:
        report.errors.append("the data set is empty: no rows")
    if heldout is not None and not heldout and not any("held-out" in e for e in report.errors):
        report.errors.append("the held-out file is empty: no rows")
    questions = {_question_key(r): r["line"] for r in rows}
    leaks = [f"held-out line {h['line']} is training line {questions[_question_key(h)]}" for h in held
             if _question_key(h) in questions]
    if leaks:
        report.errors.append(f"{len(leaks)} held-out question(s) are also training questions, so the gate would "
                             "measure memory, not learning: " + "; ".join(leaks[:SHOWN]) + _more(leaks))
    if not held and rows:
        report.warnings.append("no held-out questions: the gate's domain check will have nothing to measure; "
                               "give some with --heldout (paraphrased questions, not training ones)")
    for r in rows:
        r["id"] = r.get("id") or f"row{r['line']:05d}"
        r["split"] = "train"
    for r in held:
        r["id"] = r.get("id") or f"heldout{r['line']:05d}"
        r["split"] = "heldout"
    ids = [r["id"] for r in rows + held]
    if len(set(ids)) != len(ids):
        report.errors.append("two rows share an id; ids must be unique across both files")
    if tokenizer is not None and rows:
        _context(report, rows, tokenizer, max_length)
    report.rows = [{k: v for k, v in r.items() if k != "line"} for r in rows]
    report.heldout = [{k: v for k, v in r.items() if k != "line"} for r in held]
    if report.ok:
        report.hash = hashlib.sha256(serialize(report.rows + report.heldout)).hexdigest()
    return report


def _context(report: DatasetReport, rows: list[dict], tokenizer, max_length: int) -> None:
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    cut = [(r, n) for r, n in zip(rows, lengths) if n > max_length]
    report.stats = {"mean_tokens": round(sum(lengths) / len(lengths), 1), "max_tokens": max(lengths),
                    "max_length": max_length, "cut_rows": len(cut), "tokens": sum(lengths)}
    if cut:
        report.warnings.append(
            f"{len(cut)} row(s) are longer than the training context of {max_length} tokens and will be cut "
            f"(the prompt's start, then the answer's end): " + "; ".join(f"line {r['line']} ({n} tokens)" for r, n in cut[:SHOWN])
            + _more(cut) + "; raise max_length (--set max_length=N) or shorten them")


def edit_rows(store, embedder=None) -> list[dict]:
    """Users' edits as SFT rows: the prompt the answer was given to and the user's rewrite,
    from the preference pairs' training split (``tuning.pairs.build_preferences``: no
    withdrawn answers, no opted-out conversations; the held-out split stays out, so a later
    DPO gate still measures on data no version saw)."""
    from .pairs import build_preferences

    data = build_preferences(store, embedder=embedder)
    return [{"id": f"edit-{p.id}", "messages": p.prompt + p.chosen} for p in data.train_pairs if p.signal == "edit"]


def read_dataset(path: Path, heldout: Path | None = None, *, tokenizer=None, max_length: int = 512,
                 extra: list[dict] | None = None) -> DatasetReport:
    """Read and check an admin's file (JSONL) or ``datasets`` folder, plus ``extra`` rows
    (users' edits, ``edit_rows``) checked alike; never raises for bad content, only the
    report says so."""
    path = Path(path)
    errors: list[str] = []
    try:
        if path.is_dir():
            if heldout is not None:
                raise DatasetError("a datasets folder carries its own splits ('train', 'test'); --heldout is for JSONL files")
            train, held = _read_folder(path)
        else:
            train = parse_jsonl(read_bytes_limited(path), path.name, errors)
            held = parse_jsonl(read_bytes_limited(heldout), heldout.name, errors) if heldout is not None else None
    except DatasetError as e:
        return DatasetReport(source=str(path), errors=[str(e)])
    if extra:
        first = max((n for n, _ in train), default=0) + 1
        train = train + [(first + i, row) for i, row in enumerate(extra)]
    report = check_dataset(train, held, source=str(path), tokenizer=tokenizer, max_length=max_length, errors=errors)
    if extra:
        report.warnings.insert(0, f"{len(extra)} row(s) from users' edits added after the file's rows "
                                  f"(lines {first}-{first + len(extra) - 1} above)")
    return report


def read_uploaded(data: bytes, heldout: bytes | None = None, *, name: str = "upload", tokenizer=None,
                  max_length: int = 512) -> DatasetReport:
    """The same checks on bytes the console received (already size-limited by the caller)."""
    errors: list[str] = []
    if len(data) > MAX_FILE_BYTES or (heldout is not None and len(heldout) > MAX_FILE_BYTES):
        return DatasetReport(source=name, errors=[f"over the limit of {MAX_FILE_BYTES:,} bytes"])
    train = parse_jsonl(data, name, errors)
    held = parse_jsonl(heldout, "held-out file", errors) if heldout is not None else None
    return check_dataset(train, held, source=name, tokenizer=tokenizer, max_length=max_length, errors=errors)


def _read_folder(path: Path) -> tuple[list, list | None]:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    if size > MAX_FILE_BYTES:
        raise DatasetError(f"{path.name} holds {size:,} bytes; the limit is {MAX_FILE_BYTES:,}")
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as e:  # pragma: no cover - the library is installed with TRL
        raise DatasetError(f"reading a datasets folder needs the datasets library ({e})")
    try:
        loaded = load_from_disk(str(path))
    except Exception as e:
        raise DatasetError(f"{path.name} is not a datasets folder saved with save_to_disk ({type(e).__name__}: {e})")
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise DatasetError(f"{path.name} has splits {', '.join(loaded)}; one must be 'train'")
        train, held = loaded["train"], loaded.get("test")
    else:
        train, held = loaded, None
    if len(train) > MAX_ROWS or (held is not None and len(held) > MAX_ROWS):
        raise DatasetError(f"more than {MAX_ROWS:,} rows")
    rows = lambda d: [(i + 1, dict(r)) for i, r in enumerate(d)]  # noqa: E731 - "line" = row number
    return rows(train), (rows(held) if held is not None else None)


# -- storing ---------------------------------------------------------------------------------


def serialize(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"
                   for r in rows).encode("utf-8")


def datasets_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "datasets"


def store_dataset(data_dir: Path, report: DatasetReport) -> str:
    """Keep a clean data set at ``datasets/<hash>.jsonl`` (written once, atomically) with its
    report beside it; returns the hash."""
    if not report.ok or not report.hash:
        raise ValueError("only a data set whose report is clean is kept")
    folder = datasets_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{report.hash}.jsonl"
    if not final.exists():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(serialize(report.rows + report.heldout))
        os.replace(tmp, final)
    meta = folder / f"{report.hash}.report.json"
    if not meta.exists():
        meta.write_text(json.dumps(report.as_dict(), indent=1, ensure_ascii=False))
    return report.hash


def load_dataset(data_dir: Path, digest: str) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) of a kept data set, checked against its hash."""
    if not HASH.fullmatch(digest or ""):
        raise ValueError(f"{digest!r} is not a data set hash (64 hex digits)")
    path = datasets_dir(data_dir) / f"{digest}.jsonl"
    if not path.is_file():
        raise ValueError(f"no data set {digest[:12]} in {datasets_dir(data_dir)}; add it first (app.py dataset add)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"data set {digest[:12]} was changed on disk (its hash differs); add it again")
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "heldout"]


def dataset_report(data_dir: Path, digest: str) -> dict | None:
    """The report kept beside a data set, or None."""
    if not HASH.fullmatch(digest or ""):
        return None
    path = datasets_dir(data_dir) / f"{digest}.report.json"
    return json.loads(path.read_text()) if path.is_file() else None


# -- the console's upload --------------------------------------------------------------------


def upload_dir() -> Path:
    """Where Gradio keeps uploaded files (its own cache, never a folder a user names)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def read_upload(path: str | Path, root: Path | None = None) -> bytes:
    """The bytes of a file Gradio received, refused unless it lies in its upload cache
    (``root``): a handler is given a path, and an API caller must not be able to name any
    file on the server. Size-limited before reading (``read_bytes_limited``)."""
    root = (root or upload_dir()).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise DatasetError("only a file uploaded through the page can be checked")
    return read_bytes_limited(resolved)


class UploadChecker:
    """``check(train_bytes, heldout_bytes, name)``: the report on an uploaded data set with
    the base model's tokenizer (loaded once), kept under its hash when clean."""

    def __init__(self, data_dir: Path, model_dir: Path, max_length: int = 512):
        self.data_dir, self.model_dir, self.max_length = Path(data_dir), Path(model_dir), max_length
        self._tokenizer = None

    def __call__(self, data: bytes, heldout: bytes | None, name: str) -> DatasetReport:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        report = read_uploaded(data, heldout, name=name, tokenizer=self._tokenizer, max_length=self.max_length)
        if report.ok:
            store_dataset(self.data_dir, report)
        return report
