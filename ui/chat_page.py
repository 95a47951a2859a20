"""The chat page: a Gradio Blocks app over ``assistant.chat.ChatService``.

What a user does here: pick or start a conversation (with an optional persona), chat with
streamed answers, vote each answer up or down (changing one's mind replaces the vote), add
a comment to a down-vote, retry for another answer, edit an answer into what they wanted,
and undo their last piece of feedback. Each answer carries the model version that made it.

The same actions are API endpoints for scripts and tests (``/chat``, ``/rate``, ``/retry``,
``/edit``, ``/comment``, ``/undo_answer``, ``/history``), taking answer ids instead of
positions on the page.
"""

from __future__ import annotations

import re
from typing import Iterator

import gradio as gr

from assistant.chat import MAX_MESSAGE_CHARS, ChatInputError, ChatService, check_text, model_label
from assistant.engine import Adapter
from store import InvalidFeedback, NotFound

from .display import as_typed, shown

# The user id when no one is signed in; only reachable in tests that build the page without
# Gradio's sign-in, since the app always launches with it.
ANONYMOUS = "local"
FOOTER_RE = re.compile(r"\n*<sub>model: [^<]*</sub>\s*$")


def user_of(request: gr.Request | None) -> str:
    return (request.username if request is not None and request.username else None) or ANONYMOUS


def footer(label: str) -> str:
    return f"\n\n<sub>model: {label}</sub>"


def strip_footer(text: str) -> str:
    return FOOTER_RE.sub("", text or "")


def answer_label(answer: dict) -> str:
    adapter = None
    if answer["adapter_name"]:
        adapter = Adapter(answer["adapter_name"], "", answer["adapter_version"])
    label = model_label(answer["model"], adapter)
    return f"edited by you, from {label}" if answer["source"] == "edit" else label


class ChatPage:
    """Builds the page; handlers read the user from the request, never from globals."""

    def __init__(self, service: ChatService, title: str = "Assistant"):
        self.service = service
        self.store = service.store
        self.title = title

    # -- rendering -------------------------------------------------------------------

    def render(self, conversation_id: str | None, user_id: str) -> tuple[list[dict], list[tuple[str, str]], list]:
        """Chatbot messages, the id behind each position, and each answer's current vote."""
        if not conversation_id:
            return [], [], []
        messages, index, votes = [], [], []
        for turn in self.store.turns(conversation_id, user_id):
            messages.append({"role": "user", "content": turn.message["content"]})
            index.append(("message", turn.message["id"]))
            if turn.answer is not None:
                a = turn.answer
                messages.append({"role": "assistant", "content": shown(a["content"]) + footer(answer_label(a))})
                index.append(("answer", a["id"]))
                vote = self.store.current_rating(a["id"], user_id)
                votes.append({1: "Like", -1: "Dislike"}.get(vote))
        return messages, index, votes

    def _view(self, state: dict, user_id: str):
        messages, index, votes = self.render(state.get("conversation_id"), user_id)
        state["index"] = index
        return gr.update(value=messages, feedback_value=votes), state

    def _conversation_choices(self, user_id: str):
        return [(c["title"] or "(empty)", c["id"]) for c in self.store.conversations(user_id)]

    # -- handlers --------------------------------------------------------------------

    def on_send(self, text: str, persona: str, state: dict, request: gr.Request, excluded: bool = False):
        user = user_of(request)
        state = dict(state or {})
        try:
            check_text(text, "message", MAX_MESSAGE_CHARS)
            if not state.get("conversation_id"):
                # The box "Don't use this conversation for training" may be ticked before
                # the first message: the new conversation starts excluded then.
                state["conversation_id"] = self.service.new_conversation(user, persona, exclude_from_training=excluded)
            replies = self.service.send(state["conversation_id"], user, text)
            yield from self._stream(replies, state, user, clear_box=True)
        except (ChatInputError, NotFound) as e:
            gr.Warning(str(e))
            chat, state = self._view(state, user)
            yield chat, gr.update(), state, gr.update(), gr.update(choices=self._conversation_choices(user))

    def _stream(self, replies, state: dict, user: str, clear_box: bool):
        base, _, votes = self.render(state["conversation_id"], user)
        notice = ""
        last = None
        for reply in replies:
            last = reply
            if reply.notice:
                notice = reply.notice
            partial = list(base)
            if not partial or partial[-1]["role"] != "user" or reply.done:
                partial, _, votes = self.render(state["conversation_id"], user)
            if not reply.done:
                partial = partial + [{"role": "assistant", "content": shown(reply.text) + footer(reply.model_label)}]
            elif reply.error:
                partial = partial + [{"role": "assistant", "content": reply.text}]
            yield (
                gr.update(value=partial, feedback_value=votes),
                "" if clear_box else gr.update(),
                state,
                notice,
                gr.update(),
            )
            base = partial if not reply.done else base
        if last is not None and last.error:
            gr.Warning(last.error)
            notice = last.error
            state["failed_message_id"] = last.message_id
        else:
            state.pop("failed_message_id", None)
        chat, state = self._view(state, user)
        yield chat, "" if clear_box else gr.update(), state, notice, gr.update(
            choices=self._conversation_choices(user), value=state["conversation_id"]
        )

    def _answer_at(self, state: dict, index: int | tuple) -> str | None:
        i = index[0] if isinstance(index, (list, tuple)) else index
        positions = (state or {}).get("index") or []
        if 0 <= i < len(positions) and positions[i][0] == "answer":
            return positions[i][1]
        return None

    def on_like(self, state: dict, data: gr.LikeData, request: gr.Request):
        user = user_of(request)
        answer_id = self._answer_at(state, data.index)
        if answer_id is None:
            raise gr.Error("Only the assistant's answers can be rated.", print_exception=False)
        thumb = 1 if data.liked is True or data.liked == "Like" else -1
        try:
            value, previous = self.service.press_thumb(answer_id, user, thumb)
        except ChatInputError as e:
            raise gr.Error(str(e), print_exception=False) from e
        state = dict(state)
        state.setdefault("undo", []).append(("rate", answer_id, previous or 0))
        state["commenting"] = answer_id if value == -1 else None
        chat, state = self._view(state, user)
        return chat, state, gr.update(value=""), gr.update(visible=value == -1)

    def on_comment(self, comment: str, state: dict, request: gr.Request):
        user = user_of(request)
        answer_id = (state or {}).get("commenting")
        if not answer_id:
            raise gr.Error("Vote an answer down first, then say why.", print_exception=False)
        try:
            self.service.comment(answer_id, user, comment)
        except ChatInputError as e:
            raise gr.Error(str(e), print_exception=False) from e
        gr.Info("Thanks, your comment is saved.")
        state = dict(state)
        state["commenting"] = None
        return gr.update(value=""), gr.update(visible=False), state

    def on_retry(self, state: dict, data: gr.RetryData, request: gr.Request):
        user = user_of(request)
        state = dict(state or {})
        if state.get("failed_message_id"):
            replies = self.service.retry_message(state["failed_message_id"], user)
        else:
            positions = state.get("index") or []
            answer_id = next((pid for kind, pid in reversed(positions) if kind == "answer"), None)
            if answer_id is None:
                raise gr.Error("There is no answer to retry yet.", print_exception=False)
            replies = self.service.retry(answer_id, user)
            state.setdefault("undo", [])
        before = {a for k, a in state.get("index", []) if k == "answer"}
        try:
            for out in self._stream(replies, state, user, clear_box=False):
                yield out
        except ChatInputError as e:  # e.g. already two answers being written for this user
            raise gr.Error(str(e), print_exception=False) from e
        new = [a for k, a in state.get("index", []) if k == "answer" and a not in before]
        if new:
            state.setdefault("undo", []).append(("answer", new[-1], None))

    def on_edit(self, state: dict, data: gr.EditData, request: gr.Request):
        user = user_of(request)
        state = dict(state or {})
        answer_id = self._answer_at(state, data.index)
        if answer_id is None:
            gr.Warning("Only the assistant's answers can be edited; send a new message instead.")
            chat, state = self._view(state, user)
            return chat, state
        try:
            new_id = self.service.edit(answer_id, user, as_typed(strip_footer(data.value)))
            state.setdefault("undo", []).append(("answer", new_id, None))
            gr.Info("Your edit is saved; the original is kept too.")
        except (ChatInputError, InvalidFeedback) as e:
            gr.Warning(str(e))
        chat, state = self._view(state, user)
        return chat, state

    def on_undo(self, state: dict, request: gr.Request):
        user = user_of(request)
        state = dict(state or {})
        stack = list(state.get("undo") or [])
        if not stack:
            gr.Info("Nothing to undo.")
        else:
            kind, target, previous = stack[-1]
            try:
                if kind == "rate":
                    self.service.rate(target, user, previous)
                    gr.Info("Vote undone.")
                else:
                    self.service.withdraw(target, user)
                    gr.Info("Answer withdrawn; the previous one is back.")
            except ChatInputError as e:  # not undone: it stays on the stack for another try
                raise gr.Error(str(e), print_exception=False) from e
            stack.pop()
        state["undo"] = stack
        chat, state = self._view(state, user)
        return chat, state

    def on_new_chat(self, state: dict, request: gr.Request):
        state = {"conversation_id": None, "index": [], "undo": []}
        return [], state, "", gr.update(value=None), False

    def on_pick(self, conversation_id: str | None, state: dict, request: gr.Request):
        user = user_of(request)
        state = {"conversation_id": conversation_id or None, "index": [], "undo": []}
        if not conversation_id:
            return [], state, gr.update(), False
        try:
            conv = self.store.conversation(conversation_id, user)
        except NotFound as e:
            raise gr.Error(str(e), print_exception=False) from e
        chat, state = self._view(state, user)
        return chat, state, conv["system_prompt"], bool(conv["exclude_from_training"])

    def on_opt_out(self, excluded: bool, state: dict, request: gr.Request):
        """Store the box for this conversation; the box then shows what is stored, so a
        refused write never leaves it ticked over a conversation that stays trainable.
        Before a new chat's first message there is nothing to store: on_send reads the box."""
        cid = (state or {}).get("conversation_id")
        if not cid:
            return gr.update()
        user = user_of(request)
        try:
            stored = self.service.set_excluded_from_training(cid, user, excluded)
        except ChatInputError as e:
            gr.Warning(str(e))
            stored = bool(self.store.conversation(cid, user)["exclude_from_training"])
        except NotFound as e:
            raise gr.Error(str(e), print_exception=False) from e
        return gr.update(value=stored)

    def on_load(self, request: gr.Request):
        user = user_of(request)
        who = f"Signed in as **{user}** · [Sign out](/logout)" if request and request.username else ""
        return gr.update(choices=self._conversation_choices(user)), who

    # -- API endpoints (ids instead of page positions) --------------------------------

    def api_chat(self, message: str, conversation_id: str = "", persona: str = "", request: gr.Request = None) -> Iterator[dict]:
        """Send a message (to a new conversation when conversation_id is empty); streams the answer."""
        user = user_of(request)
        try:
            if not conversation_id:
                check_text(message, "message", MAX_MESSAGE_CHARS)
                conversation_id = self.service.new_conversation(user, persona)
            for reply in self.service.send(conversation_id, user, message):
                if reply.error:
                    raise gr.Error(reply.error, print_exception=False)
                yield {
                    "conversation_id": conversation_id,
                    "message_id": reply.message_id,
                    "answer_id": reply.answer_id,
                    "text": reply.text,
                    "model": reply.model_label,
                    "notice": reply.notice,
                    "done": reply.done,
                }
        except (ChatInputError, NotFound) as e:
            raise gr.Error(str(e), print_exception=False) from e

    def api_retry(self, answer_id: str, request: gr.Request = None) -> Iterator[dict]:
        """Another answer to the same conversation state as answer_id (kept as its sibling)."""
        user = user_of(request)
        try:
            for reply in self.service.retry(answer_id, user):
                if reply.error:
                    raise gr.Error(reply.error, print_exception=False)
                yield {"answer_id": reply.answer_id, "text": reply.text, "model": reply.model_label, "done": reply.done}
        except (ChatInputError, NotFound) as e:
            raise gr.Error(str(e), print_exception=False) from e

    def api_rate(self, answer_id: str, value: int, comment: str = "", request: gr.Request = None) -> dict:
        """Vote an answer: 1 up, -1 down, 0 clear. Returns the vote it replaced."""
        try:
            previous = self.service.rate(answer_id, user_of(request), int(value), comment or None)
        except (ChatInputError, InvalidFeedback, NotFound) as e:
            raise gr.Error(str(e), print_exception=False) from e
        return {"answer_id": answer_id, "value": int(value), "previous": previous}

    def api_comment(self, answer_id: str, comment: str, request: gr.Request = None) -> dict:
        """Add a comment to your current vote on an answer."""
        try:
            self.service.comment(answer_id, user_of(request), comment)
        except (ChatInputError, NotFound) as e:
            raise gr.Error(str(e), print_exception=False) from e
        return {"answer_id": answer_id}

    def api_edit(self, answer_id: str, text: str, request: gr.Request = None) -> dict:
        """Rewrite an answer into what you wanted; the original is kept."""
        try:
            new_id = self.service.edit(answer_id, user_of(request), text)
        except (ChatInputError, InvalidFeedback, NotFound) as e:
            raise gr.Error(str(e), print_exception=False) from e
        return {"answer_id": new_id, "edited_from": answer_id}

    def api_undo_answer(self, answer_id: str, request: gr.Request = None) -> dict:
        """Withdraw a retry or an edit; the answer before it is shown again."""
        try:
            self.service.withdraw(answer_id, user_of(request))
        except NotFound as e:
            raise gr.Error(str(e), print_exception=False) from e
        return {"withdrawn": answer_id}

    def api_history(self, conversation_id: str, request: gr.Request = None) -> list[dict]:
        """The conversation as shown: each turn with its current answer."""
        user = user_of(request)
        try:
            turns = self.store.turns(conversation_id, user)
        except NotFound as e:
            raise gr.Error(str(e), print_exception=False) from e
        return [
            {
                "message_id": t.message["id"],
                "message": t.message["content"],
                "answer_id": t.answer["id"] if t.answer else None,
                "answer": t.answer["content"] if t.answer else None,
                "model": answer_label(t.answer) if t.answer else None,
            }
            for t in turns
        ]

    # -- layout ----------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        """A whole app with only the chat page (tests, and apps without the admin loop)."""
        with gr.Blocks(title=self.title) as demo:
            self.layout(demo)
        return demo

    def layout(self, demo: gr.Blocks) -> None:
        """Put the chat page's components and events into the Blocks being built."""
        state = gr.State({"conversation_id": None, "index": [], "undo": []})
        signed_in = gr.Markdown(elem_id="signed-in")
        gr.Markdown(f"## {self.title}\nServing **{self.service.engine.model_name}**. "
                    "Vote answers up or down, retry for another answer, or edit an answer into what you "
                    "wanted (buttons under each answer): the assistant learns from it.")
        with gr.Row():
            conversations = gr.Dropdown(label="Your conversations", choices=[], scale=3, allow_custom_value=False)
            new_chat = gr.Button("New chat", scale=1)
        persona = gr.Textbox(label="Persona (system prompt for a new chat)", placeholder="You are a concise assistant.", max_lines=3)
        chatbot = gr.Chatbot(
            label="Chat", height=480, editable="all", feedback_options=("Like", "Dislike"),
            sanitize_html=True, elem_id="chatbot",
        )
        notice = gr.Markdown(elem_id="notice")
        with gr.Row():
            box = gr.Textbox(label="Message", placeholder="Ask anything", scale=5, elem_id="message")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row(visible=False) as comment_row:
            comment = gr.Textbox(label="What was wrong with that answer? (optional)", scale=5, elem_id="comment")
            send_comment = gr.Button("Send comment", scale=1, elem_id="send-comment")
        with gr.Row():
            opt_out = gr.Checkbox(label="Don't use this conversation for training", value=False, scale=3)
            undo = gr.Button("Undo last feedback", scale=1, size="sm", elem_id="undo")

        outputs = [chatbot, box, state, notice, conversations]
        send.click(self.on_send, [box, persona, state, opt_out], outputs, api_visibility="private")
        box.submit(self.on_send, [box, persona, state, opt_out], outputs, api_visibility="private")
        chatbot.like(self.on_like, [state], [chatbot, state, comment, comment_row], api_visibility="private")
        chatbot.retry(self.on_retry, [state], outputs, api_visibility="private")
        chatbot.edit(self.on_edit, [state], [chatbot, state], api_visibility="private")
        send_comment.click(self.on_comment, [comment, state], [comment, comment_row, state], api_visibility="private")
        comment.submit(self.on_comment, [comment, state], [comment, comment_row, state], api_visibility="private")
        undo.click(self.on_undo, [state], [chatbot, state], api_visibility="private")
        new_chat.click(self.on_new_chat, [state], [chatbot, state, persona, conversations, opt_out], api_visibility="private")
        conversations.input(self.on_pick, [conversations, state], [chatbot, state, persona, opt_out], api_visibility="private")
        opt_out.input(self.on_opt_out, [opt_out, state], [opt_out], api_visibility="private")
        demo.load(self.on_load, None, [conversations, signed_in], api_visibility="private")

        gr.api(self.api_chat, api_name="chat")
        gr.api(self.api_retry, api_name="retry")
        gr.api(self.api_rate, api_name="rate")
        gr.api(self.api_comment, api_name="comment")
        gr.api(self.api_edit, api_name="edit")
        gr.api(self.api_undo_answer, api_name="undo_answer")
        gr.api(self.api_history, api_name="history")
