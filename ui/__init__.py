"""The browser front end (Gradio). Thin: it reads what to show from the store and leaves
every decision (what may be sent, how a vote or an edit counts, what is served) to
``assistant.chat.ChatService``, ``loop.control.Controller`` and ``store``."""
