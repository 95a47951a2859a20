"""The self-hosted assistant: a Gradio chat page on a local model served by vLLM, and the
commands admins use.

    python app.py                      # serve: embedded SmolLM2-135M-Instruct on http://127.0.0.1:7860
    python app.py serve --model /path/to/hf-checkpoint --port 8000
    python app.py serve --host 0.0.0.0 # listen beyond loopback
    python app.py serve --vllm-url http://10.0.0.5:8000 --vllm-api-key KEY   # a vLLM already running
    python app.py serve --vllm-url URL1 --vllm-url URL2 --vllm-api-key KEY   # several, kept in step (or --vllm-urls-file F)
    python app.py serve --engine hf    # transformers+peft in process, where vLLM cannot run
    python app.py serve --api          # also the OpenAI-compatible API on port+1, for key holders
    python app.py users add alice [--admin]   # password read from the terminal or stdin
    python app.py users list | passwd NAME | admin NAME [--off] | disable NAME | enable NAME
    python app.py keys add NAME [--label L] | list [NAME] | revoke KEY_ID   # API keys, shown once
    python app.py versions                    # every adapter version, its gate and thumbs-up rate
    python app.py jobs --as admin             # the training job: stages, progress, curves, its end in a sentence
    python app.py compare v3 --as admin [--changed]   # the gate's verdict, old and new answers side by side
    python app.py feedback --as admin         # votes per day, thumbs-up rate per version with its interval
    python app.py promote v3 --as admin --reason "..." [--override]
    python app.py rollback v2|base --as admin
    python app.py canary v3 --percent 10 --as admin | canary stop --as admin
    python app.py train --as admin [--set epochs=1]   # build pairs from feedback, train, gate
    python app.py export [--out DIR]          # preference data as JSONL and datasets folders
    python app.py dataset check|add FILE [--heldout FILE] --as admin   # an SFT data set's report; add keeps it
    python app.py train --sft FILE [--heldout FILE] [--with-edits] --as admin   # supervised fine-tuning on it

Everyone signs in. On the first start with no accounts, an admin named "admin" is created
with the password in $ASSISTANT_ADMIN_PASSWORD, or a random one printed once.
Exit codes: 0 done, 1 failed, 2 usage error, 3 refused (not an admin, gate failed, bad name).

Wiring only: parse options, open the store, start the engine and the control loop, build
the page, launch; stop the vLLM server on the way out.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import signal
import sys
from functools import partial
from pathlib import Path

from assistant.config import ServeConfig
from assistant.engine import Sampling
from assistant.paths import DataPaths, database_option

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3  # the command was understood but refused (bad name, not an admin, gate...)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--models-dir", type=Path, default=None, help="where prepared base models are kept (default DATA_DIR/models)")


def _serve_options(p: argparse.ArgumentParser) -> None:
    d = ServeConfig()
    _model_options(p)
    p.add_argument("--engine", choices=["vllm", "hf"], default=d.engine, help="serving engine (default vllm)")
    p.add_argument("--vllm-url", action="append", default=[], metavar="URL",
                   help="use this running vLLM server instead of starting one; repeat for several, kept in step")
    p.add_argument("--vllm-urls-file", type=Path, default=None, metavar="FILE",
                   help="more vLLM servers, one URL a line (# comments)")
    p.add_argument("--vllm-api-key", default=os.environ.get("ASSISTANT_VLLM_API_KEY"), help="their API key (or env ASSISTANT_VLLM_API_KEY)")
    p.add_argument("--dtype", "--vllm-dtype", dest="dtype", choices=["auto", "bfloat16", "float32"], default=d.dtype,
                   help="number format for serving (default auto: bfloat16 only where this CPU/GPU computes it natively)")
    p.add_argument("--api", action="store_true", help="serve the OpenAI-compatible API (keys: app.py keys add NAME)")
    # Keys were a plain-text file before; say what replaced it instead of "unrecognized".
    p.add_argument("--api-keys", default=None, help=argparse.SUPPRESS)
    p.add_argument("--api-port", type=int, default=None, help="port of that API (default PORT+1)")
    p.add_argument("--host", default=d.host, help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--context-tokens", type=int, default=d.context_tokens, help="prompt + answer token budget")
    p.add_argument("--max-new-tokens", type=int, default=d.sampling.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.sampling.temperature, help="0 for greedy answers")
    p.add_argument("--frequency-penalty", type=float, default=d.sampling.frequency_penalty,
                   help="subtracted from a token's logit per earlier use in the answer (vLLM/OpenAI semantics)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (repeatable answers, for tests)")
    p.add_argument("--retrain-after", type=int, default=None, metavar="N", help="scheduled retraining after N new pieces of feedback (default off)")
    p.add_argument("--retrain-every-hours", type=float, default=None, help="scheduled retraining every so many hours (default off)")
    p.add_argument("--canary-min-votes", type=int, default=30, help="votes each side of a canary needs before an automatic rollback")
    p.add_argument("--pause-training-at", type=int, default=d.pause_training_at, metavar="N",
                   help="stop a running training job while N or more answers stream at once (0: never)")
    p.add_argument("--no-prepare-answers", dest="prepare_answers", action="store_false",
                   help="do not answer ahead, in the background, what the next training job answers first "
                        "(its replayed questions and the gate's regression set: minutes of a job on a 2-core CPU)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE", help="training setting for jobs started from the console (repeatable)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ServeConfig().data_dir, help="where the database, models and adapters live")
    p.add_argument("--database", default=database_option(), metavar="URL",
                   help="postgresql://user@host:port/db shared by several app replicas, or a SQLite file "
                        "(default DATA_DIR/assistant.db, or $ASSISTANT_DATABASE; give a password in "
                        "PGPASSWORD or ~/.pgpass rather than the URL)")
    sub = p.add_subparsers(dest="command")
    _serve_options(sub.add_parser("serve", help="start the chat app (the default command)"))

    users = sub.add_parser("users", help="create and manage accounts").add_subparsers(dest="action", required=True)
    add = users.add_parser("add", help="create an account")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may use the admin console")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    users.add_parser("list", help="list accounts")
    pw = users.add_parser("passwd", help="set a new password")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true")
    adm = users.add_parser("admin", help="grant or remove admin rights")
    adm.add_argument("name")
    adm.add_argument("--off", action="store_true", help="remove admin rights (default grants them)")
    for action, text in (("disable", "stop an account: no sign-in, its sessions and API keys end at once"),
                         ("enable", "let a disabled account sign in again")):
        users.add_parser(action, help=text).add_argument("name")

    keys = sub.add_parser("keys", help="API keys (stored hashed, one account each)").add_subparsers(dest="action", required=True)
    kadd = keys.add_parser("add", help="issue a key to an account; it is printed once")
    kadd.add_argument("name")
    kadd.add_argument("--label", default="", help="what the key is for (shown in listings)")
    keys.add_parser("list", help="list keys (never the keys themselves)").add_argument("name", nargs="?")
    keys.add_parser("revoke", help="revoke a key by its id").add_argument("key_id")

    sub.add_parser("versions", help="list adapter versions")
    for name, text in (("jobs", "the newest training job drawn as the console does, then earlier ones"),
                       ("feedback", "votes per day and thumbs-up rate per version with its interval"),
                       ("compare", "a version's gate verdict and its greedy answers beside the live version's")):
        c = sub.add_parser(name, help=text)
        if name == "compare":
            c.add_argument("version", help="v3 or 3")
            c.add_argument("--changed", action="store_true", help="only the answers that changed")
        c.add_argument("--as", dest="actor", required=True, help="your admin account (these show users' text)")
    for name, text in (("promote", "make a version live"), ("rollback", "go back to an earlier version or base")):
        c = sub.add_parser(name, help=text)
        c.add_argument("version", help="v3, 3, or base")
        c.add_argument("--as", dest="actor", required=True, help="the admin account doing this (recorded)")
        c.add_argument("--reason", default="")
        if name == "promote":
            c.add_argument("--override", action="store_true", help="promote despite a failed gate (needs --reason)")
        _model_options(c)
    can = sub.add_parser("canary", help="serve a version to a share of users, or stop the canary")
    can.add_argument("version", help="v3, or 'stop'")
    can.add_argument("--percent", type=float, default=10.0)
    can.add_argument("--as", dest="actor", required=True)
    _model_options(can)
    from tuning.train import add_options as train_options

    train_options(sub.add_parser("train", help="build pairs from feedback, train a version, run the gate"))
    ds = sub.add_parser("dataset", help="check an SFT data set (format, size, duplicates, unsafe text, context), or add it")
    ds.add_argument("action", choices=["check", "add"], help="check: the report only; add: keep it under its hash")
    ds.add_argument("file", type=Path, help="JSONL (messages or prompt/completion) or a datasets folder")
    ds.add_argument("--heldout", type=Path, default=None, help="held-out questions for the gate's domain check")
    ds.add_argument("--with-edits", action="store_true", help="add users' edits (prompt + their rewrite) as rows")
    ds.add_argument("--as", dest="actor", required=True, help="your admin account")
    ds.add_argument("--set", action="append", default=[], metavar="max_length=N", help="the training context to check against")
    _model_options(ds)
    ex = sub.add_parser("export", help="export preference data (JSONL and datasets folders)")
    ex.add_argument("--out", type=Path, default=None, help="folder to write (default DATA_DIR/exports/<time>/)")
    return p


def vllm_urls(a: argparse.Namespace) -> tuple[str, ...]:
    """The --vllm-url options, then the lines of --vllm-urls-file, each once."""
    urls = list(a.vllm_url)
    if a.vllm_urls_file is not None:
        for line in a.vllm_urls_file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                urls.append(line)
    if a.vllm_urls_file is not None and not urls:
        raise SystemExit(f"{a.vllm_urls_file} lists no vLLM server")
    return tuple(dict.fromkeys(u.rstrip("/") for u in urls))


def serve_config(a: argparse.Namespace) -> ServeConfig:
    d = ServeConfig()
    sampling = Sampling(temperature=a.temperature, top_p=d.sampling.top_p, max_new_tokens=a.max_new_tokens, seed=a.seed,
                        frequency_penalty=a.frequency_penalty)
    return ServeConfig(
        data_dir=a.data_dir, database=a.database, model=a.model, engine=a.engine, host=a.host, port=a.port,
        context_tokens=a.context_tokens, sampling=sampling, models_path=a.models_dir,
        vllm_urls=vllm_urls(a), vllm_api_key=a.vllm_api_key, dtype=a.dtype,
        pause_training_at=a.pause_training_at, prepare_answers=a.prepare_answers,
        api=a.api, api_port=a.api_port,
    )


def ensure_first_admin(store) -> None:
    """With no accounts yet, create 'admin' (password from the environment or printed once)."""
    if store.has_users():
        return
    password = os.environ.get("ASSISTANT_ADMIN_PASSWORD")
    shown = password is None
    password = password or secrets.token_urlsafe(12)
    store.create_user("admin", password, is_admin=True)
    if shown:
        print(
            f"\nCreated the first admin account: user 'admin', password '{password}'.\n"
            "It is shown only this once; change it with: python app.py users passwd admin\n",
            flush=True,
        )


def build(config: ServeConfig, closers: list | None = None, loop_config=None, train_set: list[str] | None = None):
    """Open the store, start the engine and the control loop; return (Gradio app, store).

    What must be stopped on exit (the vLLM server, the API, the loop) goes into ``closers``.
    """
    from assistant.adapters import base_model_identity, base_weight_shapes
    from assistant.chat import ChatService
    from assistant.model_files import resolve_model
    from assistant.serving import AdapterRouter
    from store import Store
    from loop import jobs
    from loop.control import Controller, LoopConfig
    from tuning.export import export_files_for_admin, summary_for_admin
    from loop.versions import resolve_version
    from ui.admin_page import AdminPage
    from ui.chat_page import ChatPage
    from ui.page import build_app

    from assistant.precision import machine_format

    closers = closers if closers is not None else []
    store = Store(config.db_path)
    print(f"store: {store.location}", flush=True)  # the URL without its password
    ensure_first_admin(store)
    model_path = resolve_model(config.model, config.models_dir)
    # Measured on this machine, never assumed: bf16 on a CPU without it runs 50x slower.
    fmt = machine_format(config.dtype)
    print(f"serving in {fmt.describe()}", flush=True)
    if config.engine == "vllm":
        from assistant.vllm_engine import open_vllm_engine

        engine = open_vllm_engine(config, model_path, dtype=fmt.dtype)
    else:
        from assistant.hf_engine import HFEngine

        engine = HFEngine(model_path, config.context_tokens, dtype=fmt.torch_dtype())
    closers.append(engine.close)
    shapes, base = base_weight_shapes(model_path), base_model_identity(model_path)
    router = AdapterRouter(engine)

    def adapter_of(version: int):
        return resolve_version(store, config.data_dir, version, base_shapes=shapes, base_model=base,
                               max_rank=config.max_lora_rank)

    from assistant.chat import GenerationSlots

    slots = GenerationSlots()  # the chat page's and the API's answers in progress
    launch = jobs.launcher(config, train_set or [], store, streaming=slots.active, closers=closers)
    preparer = jobs.Preparer(config, train_set or [], store, streaming=slots.active) if config.prepare_answers else None
    if preparer is not None:
        closers.append(preparer.stop)
    controller = Controller(store, router, adapter_of, launch,
                            loop_config or LoopConfig(), preparer=preparer)
    for job_id in jobs.recover_at_start(store, config.data_dir):
        print(f"training job {job_id} was left running by a process that died: marked failed", flush=True)
    for warning in controller.start():  # a live folder damaged while the app was stopped
        print(f"warning: {warning}", flush=True)
    controller.run_forever()
    closers.insert(0, controller.stop)
    service = ChatService(store=store, engine=engine, sampling=config.sampling, adapter_for=router.adapter_for,
                          slots=slots)
    if config.api:
        if config.engine != "vllm":
            raise SystemExit("--api needs --engine vllm")
        from assistant.openai_api import ApiLimits, build_api, serve_api

        api = serve_api(
            build_api(engine, router.adapter_for, store.user_for_api_key, store=store,
                      limits=ApiLimits(max_new_tokens=config.sampling.max_new_tokens), slots=service.slots),
            config.host, config.api_port or config.port + 1,
        )
        closers.insert(0, lambda: setattr(api, "should_exit", True))

    from tuning.dataset import UploadChecker

    admin = AdminPage(controller, pair_summary=partial(summary_for_admin, store),
                      exporter=partial(export_files_for_admin, store, config.data_dir),
                      dataset_checker=UploadChecker(config.data_dir, model_path))
    return build_app(ChatPage(service), admin), store


def serve(a: argparse.Namespace) -> int:
    from loop.control import LoopConfig

    if a.api_keys:
        raise SystemExit("--api-keys is gone: keys are now issued per account and stored hashed. "
                         "Issue them with: python app.py keys add NAME; serve the API with --api.")
    config = serve_config(a)
    from loop.canary import CanaryConfig

    loop = LoopConfig(retrain_min_new_feedback=a.retrain_after, retrain_every_hours=a.retrain_every_hours,
                      canary=CanaryConfig(min_votes=a.canary_min_votes))
    # SIGTERM (systemd, docker stop, a test) unwinds like Ctrl-C so the finally below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    closers: list = []
    try:
        demo, store = build(config, closers, loop, a.train_set)
        from ui.server import launch

        launch(demo, store, host=config.host, port=config.port)
    finally:
        for close in closers:
            close()
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise SystemExit("The passwords differ; nothing changed.")
    return first


def users(a: argparse.Namespace, store) -> int:
    if a.action == "add":
        store.create_user(a.name, _read_password(a.password_stdin), is_admin=a.admin)
        print(f"created {'admin' if a.admin else 'user'} {a.name}")
    elif a.action == "passwd":
        store.set_password(a.name, _read_password(a.password_stdin))
        print(f"password changed for {a.name}")
    elif a.action == "admin":
        store.set_admin(a.name, not a.off)
        print(f"{a.name} is {'no longer ' if a.off else ''}an admin")
    elif a.action in ("disable", "enable"):
        store.set_disabled(a.name, a.action == "disable")
        print(f"{a.name} is {a.action}d")
    else:
        for u in store.users():
            print(f"{u['name']}\t{'admin' if u['is_admin'] else 'user'}\t{u['created_utc']}"
                  + ("\tdisabled" if u["disabled"] else ""))
    return 0


def api_keys(a: argparse.Namespace, store) -> int:
    if a.action == "add":
        key_id, key = store.issue_api_key(a.name, a.label, created_by="command line")
        print(f"key: {key}\nid: {key_id}\nIt is shown only this once; it belongs to {a.name} "
              "(and stops working if that account is disabled).")
    elif a.action == "revoke":
        store.revoke_api_key(a.key_id)
        print(f"revoked {a.key_id}")
    else:
        for k in store.api_keys(a.name):
            print(f"{k['id']}\t{k['user_id']}\t{k['label']}\t{k['created_utc']}"
                  + (f"\trevoked {k['revoked_utc']}" if k["revoked_utc"] else ""))
    return 0


def dataset(a: argparse.Namespace) -> int:
    """``dataset check|add``: admins only, like training; 0 clean (added), 3 refused."""
    from loop import commands
    from loop.control import Refused
    from store import Store
    from tuning.train import add_dataset

    try:
        commands.require_admin(Store(DataPaths(a.data_dir).database_target(a.database)), a.actor)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    digest = add_dataset(a, a.file, a.heldout, keep=a.action == "add")
    if digest is None:
        return EXIT_REFUSED
    if a.action == "add":
        print(f"added as {digest}; train on it: app.py train --set method=sft --set dataset={digest} --as {a.actor}")
    return 0


def admin_command(a: argparse.Namespace, store) -> int:
    from assistant.model_files import resolve_model
    from loop import commands

    if a.command == "versions":
        print(commands.versions_table(store))
        return 0
    if a.command in ("jobs", "feedback", "compare"):
        commands.require_admin(store, a.actor)
        if a.command == "compare":
            version = commands.parse_version(a.version)
            if version is None:
                raise ValueError("the base model has no gate record: give a trained version, e.g. v3")
            print(commands.compare_text(store, version, changed_only=a.changed))
        else:
            print(commands.jobs_text(store) if a.command == "jobs" else commands.feedback_text(store))
        return 0
    model_dir = resolve_model(a.model, a.models_dir or DataPaths(a.data_dir).models)
    c = commands.controller(store, a.data_dir, model_dir, ServeConfig().max_lora_rank)
    if a.command == "promote":
        c.promote(a.actor, commands.parse_version(a.version), a.reason, override=a.override)
    elif a.command == "rollback":
        c.rollback(a.actor, commands.parse_version(a.version), a.reason or "rollback")
    elif a.version == "stop":
        c.stop_canary(a.actor, "stopped from the command line")
    else:
        c.start_canary(a.actor, commands.parse_version(a.version), a.percent / 100, f"canary {a.percent}%")
    live = store.live_version()
    canary = store.latest_promotion("canary")
    print(f"live: {'base' if live is None else f'v{live}'}"
          + (f"; canary: v{canary['version']} for {canary['share']:.0%} of users" if canary and canary["share"] > 0 else ""))
    print("a running server applies this within a few seconds")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve", "users", "keys", "versions", "jobs", "feedback", "compare", "promote", "rollback", "canary",
                "train", "export", "dataset"}
    # `python app.py [--data-dir D] [--database URL] [serve options]` means serve, so
    # `make run ARGS=...` works.
    if not any(arg in commands for arg in argv) and not {"-h", "--help"} & set(argv):
        data = []
        for option in ("--data-dir", "--database"):
            if option in argv:
                i = argv.index(option)
                data, argv = data + argv[i : i + 2], argv[:i] + argv[i + 2 :]
        argv = data + ["serve"] + argv
    a = parser().parse_args(argv)
    from store.postgres import DatabaseUnavailable

    try:
        return _run(a)
    except DatabaseUnavailable as e:  # a wrong URL, a server down: said once, without the password
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


def _run(a: argparse.Namespace) -> int:
    if a.command == "serve":
        return serve(a)
    from store import NotFound, Store, UserError
    from loop.control import Conflict, Refused

    if a.command == "train":
        from loop.jobs import recover_stale_jobs
        from tuning.train import run

        return run(a, recover=recover_stale_jobs)
    if a.command == "dataset":
        return dataset(a)
    if a.command == "export":
        from tuning.export import main as export_main

        export_main(["--data-dir", str(a.data_dir)] + (["--database", a.database] if a.database else [])
                    + (["--out", str(a.out)] if a.out else []))
        return 0
    store = Store(DataPaths(a.data_dir).database_target(a.database))
    try:
        if a.command == "keys":
            return api_keys(a, store)
        return users(a, store) if a.command == "users" else admin_command(a, store)
    except (UserError, Refused, Conflict, NotFound, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
