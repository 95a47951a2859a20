"""The whole app page: the chat tab for everyone, the admin tab for admins."""

from __future__ import annotations

import gradio as gr

from .admin_page import AdminPage
from .chat_page import ChatPage


def build_app(chat: ChatPage, admin: AdminPage | None = None) -> gr.Blocks:
    with gr.Blocks(title=chat.title) as demo:
        with gr.Tab("Chat", elem_id="chat-tab"):
            chat.layout(demo)
        if admin is not None:
            tab = admin.build()
            demo.load(admin.on_load, None, [tab, admin.timer], api_visibility="private")
    return demo
