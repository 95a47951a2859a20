"""The self-hosted assistant: a Gradio chat page on a local model, and its admin commands.

    python app.py                      # serve: embedded SmolLM2-135M-Instruct on http://127.0.0.1:7860
    python app.py serve --model /path/to/hf-checkpoint --port 8000
    python app.py serve --host 0.0.0.0 # listen beyond loopback
    python app.py users add alice [--admin]   # password read from the terminal or stdin
    python app.py users list | passwd NAME | admin NAME --on/--off

Everyone signs in. On the first start with no accounts, an admin named "admin" is created
with the password in $ASSISTANT_ADMIN_PASSWORD, or a random one printed once.

Wiring only: parse options, open the store, start the engine, build the page, launch.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
from pathlib import Path

from assistant.config import ServeConfig
from assistant.engine import Sampling

EXIT_USAGE = 2
EXIT_REFUSED = 3  # the command was understood but refused (bad name, unknown user...)


def _serve_options(p: argparse.ArgumentParser) -> None:
    d = ServeConfig()
    p.add_argument("--models-dir", type=Path, default=None, help="where prepared base models are kept (default DATA_DIR/models)")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--engine", choices=["hf"], default=d.engine, help="serving engine")
    p.add_argument("--host", default=d.host, help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--context-tokens", type=int, default=d.context_tokens, help="prompt + answer token budget")
    p.add_argument("--max-new-tokens", type=int, default=d.sampling.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.sampling.temperature, help="0 for greedy answers")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (repeatable answers, for tests)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ServeConfig().data_dir, help="where the database, models and adapters live")
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
    return p


def serve_config(a: argparse.Namespace) -> ServeConfig:
    d = ServeConfig()
    sampling = Sampling(temperature=a.temperature, top_p=d.sampling.top_p, max_new_tokens=a.max_new_tokens, seed=a.seed)
    return ServeConfig(
        data_dir=a.data_dir, model=a.model, engine=a.engine, host=a.host, port=a.port,
        context_tokens=a.context_tokens, sampling=sampling, models_path=a.models_dir,
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


def build(config: ServeConfig):
    """Open the store, start the engine and return (Gradio app, store); nothing launched."""
    from assistant.chat import ChatService
    from assistant.hf_engine import HFEngine
    from assistant.model_files import resolve_model
    from store import Store
    from ui.chat_page import ChatPage

    store = Store(config.db_path)
    ensure_first_admin(store)
    model_path = resolve_model(config.model, config.models_dir)
    engine = HFEngine(model_path, config.context_tokens)
    service = ChatService(store=store, engine=engine, sampling=config.sampling)
    return ChatPage(service).build(), store


def serve(a: argparse.Namespace) -> int:
    config = serve_config(a)
    demo, store = build(config)
    demo.queue(default_concurrency_limit=16).launch(
        server_name=config.host, server_port=config.port, show_error=True,
        auth=store.verify_password, auth_message="Sign in to chat with the assistant.",
    )
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise SystemExit("The passwords differ; nothing changed.")
    return first


def users(a: argparse.Namespace) -> int:
    from store import Store, UserError

    store = Store(Path(a.data_dir) / "assistant.db")
    try:
        if a.action == "add":
            store.create_user(a.name, _read_password(a.password_stdin), is_admin=a.admin)
            print(f"created {'admin' if a.admin else 'user'} {a.name}")
        elif a.action == "passwd":
            store.set_password(a.name, _read_password(a.password_stdin))
            print(f"password changed for {a.name}")
        elif a.action == "admin":
            store.set_admin(a.name, not a.off)
            print(f"{a.name} is {'no longer ' if a.off else ''}an admin")
        else:
            for u in store.users():
                print(f"{u['name']}\t{'admin' if u['is_admin'] else 'user'}\t{u['created_utc']}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    commands = {"serve", "users"}
    # `python app.py [--data-dir D] [serve options]` means serve, so `make run ARGS=...` works.
    if not any(arg in commands for arg in argv) and not {"-h", "--help"} & set(argv):
        data = []
        if "--data-dir" in argv:
            i = argv.index("--data-dir")
            data, argv = argv[i : i + 2], argv[:i] + argv[i + 2 :]
        argv = data + ["serve"] + argv
    a = p.parse_args(argv)
    return {"serve": serve, "users": users}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
