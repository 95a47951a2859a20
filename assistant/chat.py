"""Chat turns and feedback: the logic behind the chat page, with no web framework in it.

``ChatService`` checks what the user sent, builds the prompt the model sees (persona,
history trimmed oldest-first to fit the context), streams the answer from the engine and
logs it with the model version that produced it. Feedback (vote, comment, retry, edit,
undo) goes through here too, with its rules (a thumb pressed twice clears the vote). The
store is passed in (``store.Store``); this module does not import it, so serving stays free
of storage code. It knows one storage error, ``sqlite3.OperationalError`` (a database busy
past its timeout, a full disk), to turn it into a message the user can act on.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .engine import Adapter, Engine, EngineError, Sampling

# A message over this many characters is refused before it is tokenized: pasting a book
# into a chat box is almost always a mistake, and tokenizing megabytes blocks a worker.
MAX_MESSAGE_CHARS = 100_000
# The persona field is a short instruction, not a document.
MAX_SYSTEM_PROMPT_CHARS = 4_000
MAX_COMMENT_CHARS = 2_000
MAX_EDIT_CHARS = MAX_MESSAGE_CHARS
# Answers one user may have generating at once (page tabs and API scripts together): two
# covers a retry beside a running answer; more lets one user hold the engine's batch and
# the page's worker threads while everyone else waits.
MAX_GENERATIONS_PER_USER = 2


class ChatInputError(ValueError):
    """Something the user sent that cannot be used; the message says what and why."""


class NotSaved(ChatInputError):
    """The database could not take a write (locked past its busy timeout, disk full, I/O
    error): shown to the user like a refused input, with nothing half written."""


def not_saved(what: str, error: Exception) -> NotSaved:
    return NotSaved(f"{what} could not be saved: the database said \"{error}\" "
                    "(busy for too long, or the disk is full). Try again in a moment.")


@contextmanager
def saving(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as e:
        raise not_saved(what, e) from e


class GenerationSlots:
    """At most ``limit`` generations at once per user; a request over it is refused at once
    (ChatInputError), before anything is written, rather than queued."""

    def __init__(self, limit: int = MAX_GENERATIONS_PER_USER):
        self.limit = limit
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def active(self) -> int:
        """Answers being written now, all users together (a training job pauses on it)."""
        with self._lock:
            return sum(self._held.values())

    @contextmanager
    def hold(self, user_id: str) -> Iterator[None]:
        with self._lock:
            if self._held.get(user_id, 0) >= self.limit:
                raise ChatInputError(f"You already have {self.limit} answers being written; wait for one to "
                                     "finish, then send again.")
            self._held[user_id] = self._held.get(user_id, 0) + 1
        try:
            yield
        finally:  # also when the client went away and the stream was closed
            with self._lock:
                self._held[user_id] -= 1
                if not self._held[user_id]:
                    del self._held[user_id]


@dataclass
class Reply:
    """The state of an answer while it streams; the last one has ``done`` set."""

    text: str
    done: bool = False
    answer_id: str | None = None
    message_id: str | None = None
    model_label: str = ""
    notice: str | None = None  # e.g. "2 older messages were left out to fit the context"
    error: str | None = None


@dataclass(frozen=True)
class Prompt:
    messages: list[dict]
    trimmed_messages: int  # whole old messages dropped
    truncated_chars: int  # characters cut from the start of the newest message

    def notice(self) -> str | None:
        parts = []
        if self.trimmed_messages:
            parts.append(
                f"{self.trimmed_messages} older message(s) were left out so the conversation fits "
                "the model's context."
            )
        if self.truncated_chars:
            parts.append(
                f"Your message was too long for the model's context: its first "
                f"{self.truncated_chars} characters were left out."
            )
        return " ".join(parts) or None


def model_label(model: str, adapter: Adapter | None) -> str:
    return f"{model} · {'base' if adapter is None else f'v{adapter.version} ({adapter.name})'}"


def check_chars(text: str, what: str) -> str:
    """Refuse the two things no text should hold; keep every other character as typed.

    NUL: no keyboard types it, and SQLite's own functions (length, LIKE, the sqlite3 shell)
    stop at it, so what an admin queries would silently differ from what is stored.
    A lone surrogate is not Unicode text at all and cannot be written as UTF-8.
    Other control characters (escape sequences included) are kept and shown as text.
    """
    if "\x00" in text:
        raise ChatInputError(f"The {what} contains a NUL character (\\x00); remove it and try again.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatInputError(
            f"The {what} contains characters that are not valid Unicode text (a lone surrogate); "
            "remove them and try again."
        ) from None
    return text


def check_text(text: str | None, what: str, limit: int) -> str:
    text = (text or "").strip()
    if not text:
        raise ChatInputError(f"The {what} is empty: type something first.")
    if len(text) > limit:
        raise ChatInputError(
            f"The {what} is {len(text):,} characters long; the limit is {limit:,}."
        )
    return check_chars(text, what)


@dataclass
class ChatService:
    store: object  # store.Store
    engine: Engine
    sampling: Sampling = field(default_factory=Sampling)
    # Which adapter answers this user; None is the base model. Set by the serving layer.
    adapter_for: Callable[[str], Adapter | None] = lambda user_id: None
    slots: GenerationSlots = field(default_factory=GenerationSlots)

    # -- prompts -------------------------------------------------------------------

    def build_prompt(self, system_prompt: str, history: list[dict], new_message: str) -> Prompt:
        """System prompt + as much recent history as fits + the new message."""
        budget = self.engine.context_tokens - self.sampling.max_new_tokens
        head = [{"role": "system", "content": system_prompt}] if system_prompt else []
        tail = [{"role": "user", "content": new_message}]
        # Drop whole user/assistant exchanges, oldest first, so no answer loses its question.
        kept = list(history)
        dropped = 0
        total = self.engine.count_tokens(head + kept + tail)
        if kept and total > budget:
            # Each message is tokenized once (re-counting what is left after every drop was
            # quadratic: 11 s for 100 long turns). A chat template adds about the same few
            # tokens per message, so a message costs its text plus that wrapper.
            count = self.engine.count_tokens
            empty = {role: count([{"role": role, "content": ""}]) for role in {m["role"] for m in kept}}
            wrapper = count([{"role": "user", "content": ""}] * 2) - count([{"role": "user", "content": ""}])
            cost = [count([m]) - empty[m["role"]] + wrapper for m in kept]
            while dropped < len(kept) and total > budget:
                total -= sum(cost[dropped:dropped + 2])
                dropped += 2
            kept = kept[dropped:]
            # The estimate is a template's arithmetic, not its exact count: check it once, and
            # in the rare case it was short keep dropping.
            while kept and count(head + kept + tail) > budget:
                kept = kept[2:]
                dropped += 2
            dropped = min(dropped, len(history))
        truncated = 0
        if self.engine.count_tokens(head + tail) > budget:
            truncated = self._truncate_to_fit(head, new_message, budget)
            tail = [{"role": "user", "content": new_message[truncated:]}]
        return Prompt(head + kept + tail, dropped, truncated)

    def _truncate_to_fit(self, head: list[dict], text: str, budget: int) -> int:
        """Smallest number of leading characters to cut so the message fits (binary search)."""
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.engine.count_tokens(head + [{"role": "user", "content": text[mid:]}]) <= budget:
                hi = mid
            else:
                lo = mid + 1
        if lo >= len(text):
            raise ChatInputError("The persona alone fills the model's context; shorten it.")
        return lo

    def history(self, conversation_id: str, user_id: str) -> list[dict]:
        out: list[dict] = []
        for turn in self.store.turns(conversation_id, user_id):
            if turn.answer is None:
                continue  # a turn whose answer failed is not part of what the model saw
            out.append({"role": "user", "content": turn.message["content"]})
            out.append({"role": "assistant", "content": turn.answer["content"]})
        return out

    # -- turns ---------------------------------------------------------------------

    def new_conversation(self, user_id: str, system_prompt: str = "", exclude_from_training: bool = False) -> str:
        system_prompt = check_chars((system_prompt or "").strip(), "persona")
        if len(system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
            raise ChatInputError(
                f"The persona is {len(system_prompt):,} characters; the limit is {MAX_SYSTEM_PROMPT_CHARS:,}."
            )
        with saving("The new conversation"):  # the page keeps the first message in the box
            return self.store.create_conversation(user_id, system_prompt=system_prompt,
                                                  exclude_from_training=exclude_from_training)

    def set_excluded_from_training(self, conversation_id: str, user_id: str, excluded: bool) -> bool:
        """The "Don't use this conversation for training" switch; returns what is stored.
        A refused write raises NotSaved and changes nothing."""
        with saving("Your training choice"):
            self.store.update_conversation(conversation_id, user_id, exclude_from_training=excluded)
        return bool(self.store.conversation(conversation_id, user_id)["exclude_from_training"])

    def send(self, conversation_id: str, user_id: str, text: str) -> Iterator[Reply]:
        """Record the user's message and stream the answer to it."""
        text = check_text(text, "message", MAX_MESSAGE_CHARS)
        with self.slots.hold(user_id):  # before the message is saved: a refused one is not
            conv = self.store.conversation(conversation_id, user_id)
            prompt = self.build_prompt(
                conv["system_prompt"], self.history(conversation_id, user_id), text
            )
            with saving("Your message"):  # the page keeps the text in the box
                message_id = self.store.add_message(conversation_id, user_id, text)
            yield from self._answer(message_id, user_id, prompt)

    def retry(self, answer_id: str, user_id: str) -> Iterator[Reply]:
        """Another answer to exactly the conversation state the given answer answered."""
        answer = self.store.answer(answer_id, user_id)
        messages = json.loads(answer["prompt_json"])
        prompt = Prompt(messages, answer["trimmed_messages"] or 0, 0)
        with self.slots.hold(user_id):
            yield from self._answer(answer["message_id"], user_id, prompt)

    def retry_message(self, message_id: str, user_id: str) -> Iterator[Reply]:
        """Answer a user turn whose answer failed (there is no answer to retry)."""
        msg = self.store.message(message_id, user_id)
        answers = self.store.answers_to(message_id, user_id)
        if answers:
            yield from self.retry(answers[-1]["id"], user_id)
            return
        conv = self.store.conversation(msg["conversation_id"], user_id)
        history = self.history(msg["conversation_id"], user_id)
        prompt = self.build_prompt(conv["system_prompt"], history, msg["content"])
        with self.slots.hold(user_id):
            yield from self._answer(message_id, user_id, prompt)

    def _answer(self, message_id: str, user_id: str, prompt: Prompt) -> Iterator[Reply]:
        adapter = self.adapter_for(user_id)
        label = model_label(self.engine.model_name, adapter)
        notice = prompt.notice()
        text = ""
        start = time.perf_counter()
        first_token_ms = None
        finish = None
        tokens = None
        try:
            for chunk in self.engine.stream(prompt.messages, self.sampling, adapter):
                if chunk.text and first_token_ms is None:
                    first_token_ms = (time.perf_counter() - start) * 1000
                text += chunk.text
                if chunk.finish_reason:
                    finish, tokens = chunk.finish_reason, chunk.completion_tokens
                yield Reply(text, message_id=message_id, model_label=label, notice=notice)
        except EngineError as e:
            yield Reply(
                text,
                done=True,
                message_id=message_id,
                model_label=label,
                notice=notice,
                error=f"The model could not answer ({e}). Your message is saved; press retry.",
            )
            return
        try:
            answer_id = self.store.log_answer(
                message_id=message_id,
                user_id=user_id,
                prompt=prompt.messages,
                content=text,
                model=self.engine.model_name,
                adapter_name=adapter.name if adapter else None,
                adapter_version=adapter.version if adapter else None,
                sampling=self.sampling.to_dict(),
                latency_ms=(time.perf_counter() - start) * 1000,
                first_token_ms=first_token_ms,
                completion_tokens=tokens,
                finish_reason=finish,
                trimmed_messages=prompt.trimmed_messages,
            )
        except sqlite3.OperationalError as e:
            yield Reply(text, done=True, message_id=message_id, model_label=label, notice=notice,
                        error=f"{not_saved('The answer', e)} Your message is saved; press retry.")
            return
        yield Reply(
            text, done=True, answer_id=answer_id, message_id=message_id, model_label=label, notice=notice
        )

    # -- feedback ------------------------------------------------------------------

    def rate(self, answer_id: str, user_id: str, value: int, comment: str | None = None) -> int | None:
        """Vote; returns the vote it replaced (for undo)."""
        if comment is not None and comment.strip():
            # Refused, like /comment, rather than cut: a cut comment misquotes its author.
            comment = check_text(comment, "comment", MAX_COMMENT_CHARS)
        else:
            comment = None
        previous = self.store.current_rating(answer_id, user_id)
        with saving("Your vote"):
            self.store.rate(answer_id, user_id, value, comment)
        return previous

    def press_thumb(self, answer_id: str, user_id: str, thumb: int) -> tuple[int, int | None]:
        """A thumb pressed under an answer (1 up, -1 down): it votes, and pressing the same
        thumb again clears the vote, as chat apps do. Returns the vote now (1, -1 or 0) and
        the vote it replaced (for undo)."""
        value = 0 if self.store.current_rating(answer_id, user_id) == thumb else thumb
        return value, self.rate(answer_id, user_id, value)

    def comment(self, answer_id: str, user_id: str, text: str) -> None:
        text = check_text(text, "comment", MAX_COMMENT_CHARS)
        with saving("Your comment"):
            self.store.comment(answer_id, user_id, text)

    def edit(self, answer_id: str, user_id: str, new_text: str) -> str:
        new_text = check_text(new_text, "edited answer", MAX_EDIT_CHARS)
        with saving("Your edit"):
            return self.store.edit_answer(answer_id, user_id, new_text)

    def withdraw(self, answer_id: str, user_id: str) -> None:
        with saving("The undo"):
            self.store.withdraw_answer(answer_id, user_id)
