"""Export preference data as JSONL and Hugging Face ``datasets`` folders, and print a summary.

    python -m tuning.export --data-dir data                 # -> data/exports/<UTC time>/
    python -m tuning.export --data-dir data --out /tmp/prefs --eval-fraction 0.2

What a folder holds (every record also carries ids of the rows it came from):

    pairs_train.jsonl, pairs_eval.jsonl        {prompt, chosen, rejected, ...}: TRL DPOTrainer
    unpaired_train.jsonl, unpaired_eval.jsonl  {prompt, completion, label, ...}: TRL KTOTrainer
    pairs/, unpaired/                          DatasetDict(train, eval): datasets.load_from_disk
    summary.json                               counts, drops by reason, the PairConfig used

Prompts and completions are chat messages (``[{"role", "content"}]``), TRL's
conversational format; ``datasets.load_dataset("json", data_files=...)`` reads the JSONL.
Conversations marked not for training are never read, so never exported. The admin side
calls :func:`export_for_admin`, which only ever writes under ``<data_dir>/exports/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from assistant.paths import DataPaths, database_option

from .embeddings import Embedder
from .pairs import PairConfig, PreferenceData, build_preferences, format_summary

def _features(kind: str):
    """Explicit schemas, so an empty split still loads with the right columns."""
    from datasets import Features, List, Value

    messages = List({"role": Value("string"), "content": Value("string")})
    common = {"id": Value("string"), "prompt": messages}
    if kind == "pairs":
        fields = {
            "chosen": messages, "rejected": messages, "signal": Value("string"),
            "chosen_answer_id": Value("string"), "rejected_answer_id": Value("string"),
            "conversation_id": Value("string"), "rejected_conversation_id": Value("string"),
            "user_id": Value("string"), "rejected_user_id": Value("string"),
        }
    else:
        fields = {
            "completion": messages, "label": Value("bool"), "answer_id": Value("string"),
            "conversation_id": Value("string"), "user_id": Value("string"),
        }
    return Features({**common, **fields, "group_id": Value("string"), "created_utc": Value("string")})


def _rows(records) -> list[dict]:
    rows = []
    for r in records:
        row = asdict(r)
        del row["split"]  # the file name says which split
        rows.append(row)
    return rows


def export_preferences(data: PreferenceData, out_dir: Path) -> dict[str, Path]:
    """Write ``data`` into ``out_dir`` (created; must be empty if it exists); returns the files."""
    from datasets import Dataset, DatasetDict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; exports never overwrite each other.")
    files: dict[str, Path] = {}
    splits = {
        "pairs": {"train": data.train_pairs, "eval": data.eval_pairs},
        "unpaired": {"train": data.train_unpaired, "eval": data.eval_unpaired},
    }
    for kind, by_split in splits.items():
        tables = {}
        for split, records in by_split.items():
            rows = _rows(records)
            path = out_dir / f"{kind}_{split}.jsonl"
            with path.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            files[f"{kind}_{split}"] = path
            features = _features(kind)
            # from_dict, not from_list: from_list([]) drops the schema in datasets 5.2.
            columns = {name: [row[name] for row in rows] for name in features}
            tables[split] = Dataset.from_dict(columns, features=features)
        # Explicit shard counts: datasets 5.2 saves an empty split as zero shards, which
        # load_from_disk then cannot read. 500 MB per shard is datasets' own default.
        shards = {k: max(1, math.ceil(t.data.nbytes / 500e6)) for k, t in tables.items()}
        DatasetDict(tables).save_to_disk(str(out_dir / kind), num_shards=shards)
        files[kind] = out_dir / kind
    summary_path = out_dir / "summary.json"
    summary = dict(data.summary, files={k: p.name for k, p in files.items()})
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    files["summary"] = summary_path
    return files


def _new_export_dir(data_dir: Path) -> Path:
    root = Path(data_dir) / "exports"
    root.mkdir(parents=True, exist_ok=True)
    # exports/ must really be inside the data folder: a link to elsewhere would let the
    # admin page write (and the app serve files) outside it.
    if root.is_symlink() or root.resolve() != Path(data_dir).resolve() / "exports":
        raise ValueError(f"{root} leads outside the data folder ({root.resolve()}); nothing was exported.")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1000):
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"Too many exports at {stamp} in {root}.")


def export_for_admin(
    store, data_dir: Path, config: PairConfig = PairConfig(), embedder: Embedder | None = None
) -> tuple[Path, PreferenceData]:
    """Build and export into a new ``<data_dir>/exports/<UTC time>/``; returns it and the data.

    The admin page takes no path from its user: the folder is always a fresh one under the
    data directory, so a typed path can never overwrite or leak files elsewhere.
    """
    data = build_preferences(store, config, embedder)
    out = _new_export_dir(data_dir)
    export_preferences(data, out)
    return out, data


def export_files_for_admin(
    store, data_dir: Path, config: PairConfig = PairConfig(), embedder: Embedder | None = None
) -> list[str]:
    """``export_for_admin`` as the admin page offers it: the paths of the files written, the
    JSON lines files first and ``summary.json`` last."""
    folder, _ = export_for_admin(store, data_dir, config, embedder)
    return [str(p) for p in sorted(folder.glob("*.jsonl"))] + [str(folder / "summary.json")]


def summary_for_admin(store) -> dict:
    """The pair builder's summary of the feedback as it stands, for the admin page (which
    says it in sentences: ``loop.reports.feedback_sentences``)."""
    return build_preferences(store).summary


def main(argv: list[str] | None = None, embedder: Embedder | None = None) -> Path:
    d = PairConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="the app's data folder (holds assistant.db)")
    p.add_argument("--database", default=database_option(),
                   help="a postgresql:// URL or SQLite file instead of DATA_DIR/assistant.db (default $ASSISTANT_DATABASE)")
    p.add_argument("--out", type=Path, default=None, help="empty or new folder to write (default DATA_DIR/exports/<UTC time>)")
    p.add_argument("--similarity", type=float, default=d.same_prompt_similarity, help="cosine at or above which two prompts are one")
    p.add_argument("--per-user-cap", type=int, default=d.per_user_cap)
    p.add_argument("--per-group-cap", type=int, default=d.per_group_cap)
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    from store import Store

    datasets.disable_progress_bars()  # the summary is the output; bars would bury it

    db = DataPaths(a.data_dir).database_target(a.database)
    if "://" not in str(db) and not Path(db).exists():
        p.error(f"no database at {db}")
    if a.out is not None and a.out.exists() and any(a.out.iterdir()):
        p.error(f"{a.out} is not empty; exports never overwrite each other")
    config = PairConfig(
        same_prompt_similarity=a.similarity, numbers_must_match=d.numbers_must_match,
        max_embed_chars=d.max_embed_chars, per_user_cap=a.per_user_cap,
        per_group_cap=a.per_group_cap, eval_fraction=a.eval_fraction,
    )
    store = Store(db)
    if a.out is None:
        out, data = export_for_admin(store, a.data_dir, config, embedder)
    else:
        data = build_preferences(store, config, embedder)
        out = a.out
        export_preferences(data, out)
    print(format_summary(data.summary))
    print(f"Wrote {out}")
    return out


if __name__ == "__main__":
    main()
